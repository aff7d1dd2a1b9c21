"""tsubame/pretrain.sh, TSUBAME 4.0's Grid Engine job script: its host parsing and the commands it
builds (DRY_RUN=1, a PE_HOSTFILE of two nodes as TSUBAME writes it), then the script itself, unedited,
run by a real Grid Engine on this host (one node: qrsh -inherit starts torchrun on it)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from test_two_nodes import assert_like as assert_close
from train_runs import ROOT, base_args, environment, losses, records, train_ok

SCRIPT = ROOT / "tsubame" / "pretrain.sh"
@pytest.fixture(scope="module")
def one_process_8(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one-process")
    train_ok(base_args(shards, run_dir, **{"train.steps": 8, "checkpoint.interval": 0}))
    return losses(run_dir)


TWO_NODES = "r1n1 192 all.q@r1n1 UNDEFINED\nr1n2 192 all.q@r1n2 UNDEFINED\nr1n2 192 gpu.q@r1n2 UNDEFINED\n"


CONFIG = "examples/tohoku-bert-500m.yaml"


def dry_run(tmp_path: Path, hostfile: str, args=(CONFIG, "--train.steps", "5"), **env) -> subprocess.CompletedProcess:
    (tmp_path / "pe_hostfile").write_text(hostfile)
    (tmp_path / "examples").mkdir(exist_ok=True)
    (tmp_path / CONFIG).write_text((ROOT / CONFIG).read_text())
    env = {**environment(), "PATH": f"{Path(sys.executable).parent}:{environment()['PATH']}", "DRY_RUN": "1",
           "PE_HOSTFILE": str(tmp_path / "pe_hostfile"), "JOB_ID": "4242", "TMPDIR": str(tmp_path / "local"), **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)


def test_torchrun_per_node_from_the_pe_hostfile_with_mpirun(tmp_path):
    result = dry_run(tmp_path, TWO_NODES)
    assert result.returncode == 0, result.stderr
    rendezvous, command = result.stdout.splitlines()
    assert rendezvous.startswith("rendezvous: r1n1:29742, 2 node(s) (r1n1 r1n2) of job 4242")  # 29500 + 4242 % 2000
    assert command.startswith("mpirun -n 2 -npernode 1 -hostfile ")
    assert (tmp_path / "local" / "megatron_jp" / "hostfile").read_text() == "r1n1 slots=1\nr1n2 slots=1\n"
    assert ("torchrun --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=r1n1:29742 "
            "--rdzv-id=4242 -m megatron_jp.train --config examples/tohoku-bert-500m.yaml --train.steps 5") in command
    # the index cache goes to each node's own $TMPDIR, worked out on that node
    words = shlex.split(command)
    script = words[words.index("-c") + 1]
    assert words[words.index("-c") - 1] == "bash" and words[words.index("-c") + 2:][:2] == ["bash", "torchrun"]
    assert script == 'exec "$@" --data.cache_dir "${INDEX_CACHE_DIR:-${TMPDIR:-$MEGATRON_JP_TMPDIR}/megatron_jp/index_cache}"'
    assert " -x MEGATRON_JP_TMPDIR " in command
    named = dry_run(tmp_path, TWO_NODES, (CONFIG, "--data.cache_dir", "/x")).stdout  # the user's folder wins
    assert " bash -c " not in named and named.count("--data.cache_dir") == 1
    for name in ("PATH", "MASTER_ADDR", "NCCL_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):  # to the other node
        assert f" -x {name} " in command


def test_qrsh_launcher_starts_one_torchrun_per_host_in_the_job_folder(tmp_path):
    result = dry_run(tmp_path, TWO_NODES, LAUNCHER="qrsh", GPUS_PER_NODE="2")
    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()[1:]
    assert [c.split()[:4] for c in commands] == [["qrsh", "-inherit", "-nostdin", h] for h in ("r1n1", "r1n2")]
    assert all(f"cd {tmp_path} && exec env " in c and "--nproc-per-node=2" in c for c in commands)
    assert all("MASTER_ADDR=r1n1" in c for c in commands)  # the environment travels with each command


@pytest.mark.parametrize("args, env, message", [
    ((CONFIG,), {"PE_HOSTFILE": ""}, "PE_HOSTFILE is not set"),
    ((CONFIG,), {"PE_HOSTFILE": "/nonexistent/pe_hostfile"}, "PE_HOSTFILE /nonexistent/pe_hostfile cannot be read"),
    ((CONFIG,), {"HOSTS": ""}, "lists no host"),
    ((), {}, "no config given; usage: qsub"),
    (("missing.yaml",), {}, "config missing.yaml is not a file"),
    ((CONFIG,), {"LAUNCHER": "ssh"}, "LAUNCHER=ssh (choose mpirun or qrsh)"),
    ((CONFIG,), {"GPUS_PER_NODE": "four"}, "GPUS_PER_NODE=four is not a positive number"),
], ids=["no-pe-hostfile", "unreadable-hostfile", "no-host", "no-config", "missing-config", "launcher", "gpus"])
def test_bad_input_exits_2_with_one_error_line_naming_it(tmp_path, args, env, message):
    hosts = env.pop("HOSTS", TWO_NODES)
    result = dry_run(tmp_path, hosts, args, **env)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr, \
        result.stderr


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


@pytest.mark.parametrize("launcher", ["qrsh", "mpirun"])
def test_the_script_trains_on_two_grid_engine_nodes_like_one_process(gridengine2, shards, one_process_8, tmp_path,
                                                                     launcher):
    """-pe f_node 2 (one slot per host): $PE_HOSTFILE names node1 and node2; the launcher starts one torchrun
    on each, each node's index cache lands in its own $TMPDIR. Parity as in test_two_nodes.py."""
    run_dir = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  preset: tiny\n")
    args = base_args(shards, run_dir, **{"train.steps": 8, "checkpoint.interval": 0, "parallel.timeout_minutes": 2})
    env = {**environment(), "PATH": f"{Path(sys.executable).parent}:{environment()['PATH']}",
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}  # the test's jobs run as root
    submitted = gridengine2.run(["qsub", "-terse", "-V", "-pe", "f_node", "2", "-l", "node_f=1,h_rt=0:05:00",
                                 "-o", str(tmp_path / "job.out"), "-v", f"LAUNCHER={launcher},GPUS_PER_NODE=1",
                                 str(SCRIPT), str(config), *args], env=env, cwd=tmp_path)
    job_id = submitted.stdout.strip()
    record = gridengine2.wait(job_id, timeout_s=240)
    out = (tmp_path / "job.out").read_text(errors="replace")
    assert record["exit_status"].strip() == "0", out[-3000:]
    first = out.split("rendezvous: ", 1)[1].split(":", 1)[0]  # the job's master host, the first of $PE_HOSTFILE
    other = {"node1": "node2", "node2": "node1"}[first]
    assert f"rendezvous: {first}:{29500 + int(job_id) % 2000}, 2 node(s) ({first} {other}) of job {job_id}" in out, out
    found = re.search(r"environment: 2 node\(s\) \((node[12]), (node[12])\), 2 ranks \(1 per node\)", out)
    assert found and found[1] != found[2], out[-3000:]
    rank0_host = found[1]  # torchrun's rendezvous may put rank 0 on either node
    assert_close(losses(run_dir), one_process_8)
    # rank 0 built the index cache in the $TMPDIR of its own node, which need not be the job's master host
    # (Grid Engine removes the folder with the job)
    # (Grid Engine removes the folder with the job); the line may be cut by another process's warning
    cache = f"{gridengine2.scratch(rank0_host)}/{job_id}.1.all.q/megatron_jp/index_cache"
    assert cache in out, (cache, [line for line in out.splitlines() if "index cache" in line])
