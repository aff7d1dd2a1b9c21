"""Multi-node launch without a cluster: two torchrun agents (`--nnodes 2`, one worker each) meet over a
c10d rendezvous on 127.0.0.1, as two nodes of pretrain.sbatch do, and train exactly like one agent
with the same world size (2 workers). Same layout (dp=2), CPU, fp32: losses equal bit for bit."""

import subprocess
import sys

from train_runs import ROOT, base_args, environment, losses, records


def torchrun(nnodes: int, nproc: int, endpoint: str, run_id: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}",
            "-m", "megatron_jp.train", *args]


def run_agents(commands: list[list[str]], timeout_s: float = 300) -> list[str]:
    agents = [subprocess.Popen(c, cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True) for c in commands]
    try:
        outputs = [agent.communicate(timeout=timeout_s)[0] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    assert [a.returncode for a in agents] == [0] * len(agents), "\n---\n".join(o[-3000:] for o in outputs)
    return outputs


def test_two_torchrun_agents_over_c10d_train_exactly_like_one_agent(shards, tmp_path, free_port):
    overrides = {"train.steps": 8, "checkpoint.interval": 0, "parallel.timeout_minutes": 2}
    one, two = tmp_path / "one-agent", tmp_path / "two-agents"
    endpoint = f"127.0.0.1:{free_port}"
    run_agents([torchrun(1, 2, endpoint, "one", base_args(shards, one, **overrides))])
    outputs = run_agents([torchrun(2, 1, endpoint, "two", base_args(shards, two, **overrides)) for _ in range(2)])
    assert [r["step"] for r in records(two) if "loss" in r] == list(range(1, 9))
    assert losses(two) == losses(one)
    report = next(o for o in outputs if "environment: " in o)  # rank 0's agent printed it, once
    assert sum(o.count("environment: ") for o in outputs) == 1
    assert "2 ranks (2 per node)" in report and "LOCAL_WORLD_SIZE=1" in report  # 2 agents of 1 worker
