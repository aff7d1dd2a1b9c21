"""tsubame/pretrain.sh, TSUBAME 4.0's Grid Engine job script: its host parsing and the commands it
builds (DRY_RUN=1, a PE_HOSTFILE of two nodes as TSUBAME writes it), then the script itself, unedited,
run by a real Grid Engine on this host (one node: qrsh -inherit starts torchrun on it)."""

import subprocess
import sys
from pathlib import Path

import pytest

from train_runs import ROOT, base_args, environment, records

SCRIPT = ROOT / "tsubame" / "pretrain.sh"
TWO_NODES = "r1n1 192 all.q@r1n1 UNDEFINED\nr1n2 192 all.q@r1n2 UNDEFINED\nr1n2 192 gpu.q@r1n2 UNDEFINED\n"


def dry_run(tmp_path: Path, hostfile: str, **env) -> subprocess.CompletedProcess:
    (tmp_path / "pe_hostfile").write_text(hostfile)
    env = {**environment(), "PATH": f"{Path(sys.executable).parent}:{environment()['PATH']}", "DRY_RUN": "1",
           "PE_HOSTFILE": str(tmp_path / "pe_hostfile"), "JOB_ID": "4242", "TMPDIR": str(tmp_path / "local"), **env}
    return subprocess.run(["bash", str(SCRIPT), "examples/tohoku-bert-500m.yaml", "--train.steps", "5"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)


def test_torchrun_per_node_from_the_pe_hostfile_with_mpirun(tmp_path):
    result = dry_run(tmp_path, TWO_NODES)
    assert result.returncode == 0, result.stderr
    rendezvous, command = result.stdout.splitlines()
    assert rendezvous.startswith("rendezvous: r1n1:29742, 2 node(s) (r1n1 r1n2) of job 4242")  # 29500 + 4242 % 2000
    assert command.startswith("mpirun -n 2 -npernode 1 -hostfile ")
    assert (tmp_path / "local" / "megatron_jp" / "hostfile").read_text() == "r1n1 slots=1\nr1n2 slots=1\n"
    assert ("torchrun --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=r1n1:29742 "
            "--rdzv-id=4242 -m megatron_jp.train --config examples/tohoku-bert-500m.yaml --data.cache_dir "
            f"{tmp_path}/local/megatron_jp/index_cache --train.steps 5") in command
    for name in ("PATH", "MASTER_ADDR", "NCCL_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):  # to the other node
        assert f" -x {name} " in command


def test_qrsh_launcher_starts_one_torchrun_per_host_in_the_job_folder(tmp_path):
    result = dry_run(tmp_path, TWO_NODES, LAUNCHER="qrsh", GPUS_PER_NODE="2")
    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()[1:]
    assert [c.split()[:4] for c in commands] == [["qrsh", "-inherit", "-nostdin", h] for h in ("r1n1", "r1n2")]
    assert all(f"cd {tmp_path} && exec env " in c and "--nproc-per-node=2" in c for c in commands)
    assert all("MASTER_ADDR=r1n1" in c for c in commands)  # the environment travels with each command


@pytest.mark.parametrize("hostfile, message", [("", "lists no host"), (None, "PE_HOSTFILE is not set")])
def test_a_job_without_hosts_is_refused_with_the_reason(tmp_path, hostfile, message):
    result = dry_run(tmp_path, hostfile or "", **({"PE_HOSTFILE": ""} if hostfile is None else {}))
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_the_script_trains_under_a_real_grid_engine(gridengine, shards, tmp_path):
    run_dir = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  preset: tiny\n")
    args = base_args(shards, run_dir, **{"train.steps": 8, "checkpoint.interval": 0, "parallel.timeout_minutes": 2})
    env = {**environment(), "PATH": f"{Path(sys.executable).parent}:{environment()['PATH']}"}
    # the #$ lines ask for node_f=2 and h_rt=01:00:00; the command line overrides them, as on TSUBAME
    submitted = gridengine.run(["qsub", "-terse", "-V", "-pe", "f_node", "1", "-l", "node_f=1,h_rt=0:05:00",
                                "-o", str(tmp_path / "job.out"), "-v", "LAUNCHER=qrsh,GPUS_PER_NODE=2",
                                str(SCRIPT), str(config), *args], env=env, cwd=tmp_path)
    job_id = submitted.stdout.strip()
    record = gridengine.wait(job_id, timeout_s=240)
    out = (tmp_path / "job.out").read_text(errors="replace")
    assert record["exit_status"].strip() == "0", out[-3000:]
    node, port = gridengine.node, 29500 + int(job_id) % 2000
    assert f"rendezvous: {node}:{port}, 1 node(s) ({node}) of job {job_id}" in out
    assert f"environment: 1 node(s) ({gridengine.node}), 2 ranks (2 per node)" in out
    assert [r["step"] for r in records(run_dir) if "loss" in r] == list(range(1, 9))
    assert (tmp_path / "logs").is_dir()  # -cwd: the job ran in the submission folder
