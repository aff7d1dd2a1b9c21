"""What every rank sees at start-up, gathered once and printed by rank 0.

Multi-node runs fail or crawl for reasons that live in the environment: a node whose NCCL variables
differ, a GPU count that is not what the job asked for, a gloo group bound to the wrong interface, a
torch built for another CUDA. One all-gather at start-up collects each rank's view; rank 0 prints
nodes, ranks and GPUs per node, the network variables (a value shared by every rank once, the others
per node) and the versions, and writes the whole record to RUN_DIR/environment.json.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

# NCCL/gloo/InfiniBand/UCX settings and what the launcher decided: the variables that explain a hang
# or a slow run. Names, not values, are matched: nothing else of the environment is collected.
PREFIXES = ("NCCL_", "TORCH_NCCL_", "GLOO_", "UCX_", "IBV_", "OMPI_MCA_btl", "FI_")
NAMES = ("MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_MAX_CONNECTIONS", "OMP_NUM_THREADS",
         "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "JOB_ID", "PE_HOSTFILE", "TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE")


def rank_view(environ=None) -> dict:
    """This rank's host, devices, versions and network variables."""
    env = os.environ if environ is None else environ
    cuda = torch.cuda.is_available()
    return {"host": socket.gethostname(),
            "gpus": torch.cuda.device_count() if cuda else 0,
            "gpu_name": torch.cuda.get_device_name() if cuda else None,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
            "infiniband": infiniband_devices(),
            "variables": {k: v for k, v in sorted(env.items()) if k.startswith(PREFIXES) or k in NAMES}}


def infiniband_devices(sysfs: str = "/sys/class/infiniband") -> list[str]:
    """The host's InfiniBand (RDMA) devices, e.g. mlx5_0: what NCCL_IB_HCA may name."""
    try:
        return sorted(os.listdir(sysfs))
    except OSError:
        return []


def gather(world_size: int) -> list[dict]:
    """Every rank's view, in rank order (collective; a world of one needs no process group)."""
    mine = rank_view()
    if world_size == 1:
        return [mine]
    views: list = [None] * world_size
    dist.all_gather_object(views, mine)
    return views


def summarize(views: list[dict], backend: str) -> dict:
    hosts = list(dict.fromkeys(v["host"] for v in views))
    per_host = {h: [i for i, v in enumerate(views) if v["host"] == h] for h in hosts}
    variables: dict[str, dict[str, list[str]]] = {}  # name -> {value: hosts of the ranks that have it}
    for name in sorted({k for v in views for k in v["variables"]}):
        by_value: dict[str, list[str]] = {}
        for v in views:
            hosts_of_value = by_value.setdefault(v["variables"].get(name, "(unset)"), [])
            if v["host"] not in hosts_of_value:
                hosts_of_value.append(v["host"])
        variables[name] = by_value
    first = views[0]
    return {"nodes": len(hosts), "hosts": hosts, "ranks": len(views),
            "ranks_per_node": {h: len(r) for h, r in per_host.items()},
            "gpus_per_node": {h: views[r[0]]["gpus"] for h, r in per_host.items()},
            "infiniband": {h: ", ".join(views[r[0]].get("infiniband", [])) or "none" for h, r in per_host.items()},
            "gpu_name": first["gpu_name"], "backend": backend,
            "torch": sorted({v["torch"] for v in views}), "cuda": sorted({str(v["cuda"]) for v in views}),
            "nccl": first["nccl"], "variables": variables}


def format_summary(s: dict) -> str:
    def compact(by_host: dict) -> str:
        values = set(by_host.values())
        return str(values.pop()) if len(values) == 1 else ", ".join(f"{h}: {n}" for h, n in by_host.items())

    shown_hosts = ", ".join(s["hosts"][:8]) + (f", ... ({s['nodes']} in all)" if s["nodes"] > 8 else "")
    lines = [f"environment: {s['nodes']} node(s) ({shown_hosts}), {s['ranks']} ranks "
             f"({compact(s['ranks_per_node'])} per node), GPUs per node {compact(s['gpus_per_node'])}"
             f"{' (' + s['gpu_name'] + ')' if s['gpu_name'] else ''}",
             f"  backend {s['backend']}, torch {' / '.join(s['torch'])}, CUDA {' / '.join(s['cuda'])}"
             f"{', NCCL ' + s['nccl'] if s['nccl'] else ''}; InfiniBand devices {compact(s['infiniband'])}"]
    for name, by_value in s["variables"].items():
        if len(by_value) == 1:
            lines.append(f"  {name}={next(iter(by_value))}")
        else:  # the usual culprit of a multi-node hang: say where each value is
            lines.append(f"  {name} differs across ranks: " + "; ".join(
                f"{value} on {', '.join(hosts)}" for value, hosts in by_value.items()))
    if len(s["torch"]) > 1 or len(s["cuda"]) > 1:
        lines.append("  warning: the ranks run different torch or CUDA versions")
    return "\n".join(lines)


def report(world_size: int, rank: int, run_dir: str | os.PathLike) -> dict | None:
    """Gather every rank's view; rank 0 prints it and writes RUN_DIR/environment.json (temp + rename)."""
    views = gather(world_size)
    if rank != 0:
        return None
    backend = dist.get_backend() if dist.is_initialized() else "none (one process)"
    summary = summarize(views, backend)
    print(format_summary(summary), flush=True)
    path = Path(run_dir) / "environment.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**summary, "per_rank": views}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return summary
