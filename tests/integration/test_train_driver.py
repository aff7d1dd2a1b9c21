"""`python -m megatron_jp.train` end to end: exact resume after SIGKILL, resume into another layout,
new phases from a checkpoint, curricula in the metrics, refusal of bad input before training.

Resume is compared bit for bit (fp32 on CPU, the same layout: the same operations in the same order
on the same values). Across layouts the arithmetic is reassociated (partial sums per shard), so
losses agree to 1e-5 relative, as in tests/distributed/test_parallel_training.py.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from train_runs import (EXAMPLE_CORPUS, ROOT, base_args, environment, last_step, losses, records,
                        train, train_ok, train_until_killed, train_until_signalled)

CONTRACT_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_second", "tflops_per_gpu", "mfu",
                 "global_batch_size", "seq_length", "mask_prob"}
CURRICULA = {"train.rampup_batch_size": "4 4 6", "data.seq_length_stages": "0:32,8:64",
             "data.mask_prob_stages": "0:0.3,12:0.15", "eval.interval": 10, "eval.steps": 2}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted single-process 20-step run with every curriculum switched on."""
    run_dir = tmp_path_factory.mktemp("reference")
    train_ok(base_args(data, run_dir, **CURRICULA))
    return run_dir


def test_metrics_follow_the_contract_and_the_curricula(reference):
    lines = [r for r in records(reference) if "loss" in r]
    assert [r["step"] for r in lines] == list(range(1, 21))
    assert all(CONTRACT_KEYS <= r.keys() for r in lines)
    assert [r["global_batch_size"] for r in lines[:7]] == [4] * 6 + [8]  # ramp: 4 for 6 steps, then 8
    assert {r["seq_length"] for r in lines[:8]} == {32} and {r["seq_length"] for r in lines[8:]} == {64}
    assert {r["mask_prob"] for r in lines[:12]} == {0.3} and {r["mask_prob"] for r in lines[12:]} == {0.15}
    valid = [r for r in records(reference) if "valid_loss" in r]
    assert [r["step"] for r in valid] == [10, 20] and all(0 <= r["valid_accuracy"] <= 1 for r in valid)
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert (reference / "tensorboard").is_dir()
    assert (reference / "checkpoints" / "latest").read_text().strip() == "iter_0000020"


@pytest.mark.parametrize("async_save", [False, True], ids=["sync-save", "async-save"])
def test_run_killed_at_step_13_resumes_with_bitwise_identical_losses(data, reference, tmp_path, async_save):
    args = base_args(data, tmp_path, **CURRICULA, **{"checkpoint.async_save": str(async_save).lower()})
    train_until_killed(args, tmp_path, kill_after_step=13)
    # an async save is published once complete, at the latest when the next one starts
    published = {"iter_0000005", "iter_0000010"} if async_save else {"iter_0000010"}
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() in published
    result = train_ok(args)
    assert "resumed from" in result.stdout
    assert losses(tmp_path) == losses(reference)  # == on floats: bit for bit


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits_cleanly(data, tmp_path):
    process = train_until_signalled(base_args(data, tmp_path, **{"checkpoint.interval": 0}), tmp_path, after_step=3)
    assert process.returncode == 0, process.stderr.read()[-3000:]
    stopped = last_step(tmp_path)
    assert 3 <= stopped < 20
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"iter_{stopped:07d}"


def test_ctrl_c_saves_a_checkpoint_at_the_current_step_and_exits_cleanly(data, tmp_path):
    process = train_until_signalled(base_args(data, tmp_path, **{"checkpoint.interval": 0}), tmp_path, after_step=3,
                                    sig=signal.SIGINT)
    assert process.returncode == 0, process.stderr.read()[-3000:]
    stopped = last_step(tmp_path)
    assert 3 <= stopped < 20
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"iter_{stopped:07d}"


def test_a_second_run_on_the_same_run_dir_is_refused_before_training_naming_host_and_pid(data, tmp_path):
    # the lock of a live run (this test process), as training/runtime/run_lock.py writes it
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                "what": "a training run", "started": "now"}))
    result = train(base_args(data, tmp_path), timeout_s=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.yaml").exists()
    assert (tmp_path / ".lock").exists()  # not ours to remove


def test_a_checkpoint_dir_with_iterations_but_no_latest_is_refused_and_left_alone(data, tmp_path):
    old = tmp_path / "checkpoints" / "iter_0000005"
    old.mkdir(parents=True)
    result = train(base_args(data, tmp_path), timeout_s=120)
    assert result.returncode == 2 and "no `latest`" in result.stderr and "iter_0000005" in result.stderr
    assert old.is_dir() and not (tmp_path / "metrics.jsonl").exists()


def test_tp2_pp2_run_killed_at_step_13_resumes_with_bitwise_identical_losses(data, tmp_path):
    layout = {"parallel.tensor": 2, "parallel.pipeline": 2, "train.steps": 16, "checkpoint.interval": 8,
              "data.seq_length_stages": "0:32,6:64"}
    uninterrupted = tmp_path / "uninterrupted"
    train_ok(base_args(data, uninterrupted, **layout), nproc=4, timeout_s=400)
    resumed = tmp_path / "resumed"
    args = base_args(data, resumed, **layout)
    train_until_killed(args, resumed, kill_after_step=13, nproc=4, timeout_s=400)
    train_ok(args, nproc=4, timeout_s=400)
    assert losses(resumed) == losses(uninterrupted)


def test_resume_into_another_layout_continues_with_matching_losses(data, tmp_path):
    first = tmp_path / "tp2"
    train_ok(base_args(data, first, **{"parallel.tensor": 2, "train.steps": 12, "checkpoint.interval": 6}), nproc=2)
    second = tmp_path / "dp2zero1"
    shutil.copytree(first / "checkpoints" / "iter_0000006", second / "checkpoints" / "iter_0000006")
    (second / "checkpoints" / "latest").write_text("iter_0000006\n")
    train_ok(base_args(data, second, **{"parallel.zero1": "true", "train.steps": 12}), nproc=2)  # dp=2
    expected, got = losses(first), losses(second)
    assert sorted(got) == list(range(7, 13))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


def test_new_phase_starts_from_a_checkpoint_with_longer_sequences_and_fresh_optimizer(data, reference, tmp_path):
    source = reference / "checkpoints"
    result = train_ok(base_args(data, tmp_path, **{"checkpoint.load": str(source), "checkpoint.reset_optimizer": "true",
                                                   "checkpoint.reset_schedule": "true", "data.seq_length": 128,
                                                   "model.rope_theta": 160000, "train.steps": 4}))
    assert "new phase from" in result.stdout
    lines = [r for r in records(tmp_path) if "loss" in r]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and {r["seq_length"] for r in lines} == {128}
    fresh = [r for r in records(reference) if "loss" in r][0]["loss"]
    assert lines[0]["loss"] < fresh  # starts from the trained weights, not from scratch


def test_non_finite_steps_are_skipped_and_too_many_in_a_row_abort(data, tmp_path):
    result = train(base_args(data, tmp_path, **{"optim.lr": 1e30, "optim.warmup_steps": 0, "optim.clip_grad": 0,
                                                "train.max_skipped_steps": 3}))
    assert result.returncode == 1
    assert "3 steps in a row had a non-finite loss" in result.stderr
    lines = [r for r in records(tmp_path) if "loss" in r]
    assert lines[-1]["skipped_steps"] == 3
    assert not (tmp_path / "checkpoints" / "latest").exists() or last_step(tmp_path) < 5


@pytest.mark.parametrize("overrides, message", [
    ({"data.paths": "/nonexistent/shard"}, "/nonexistent/shard"),
    ({"parallel.tensor": 3}, "parallel.tensor"),
    ({"model.vocab_size": 128}, "model.vocab_size"),
    ({"checkpoint.load": "/nonexistent/ckpt"}, "/nonexistent/ckpt"),
])
def test_bad_input_is_refused_before_training_with_the_key_or_file_named(data, tmp_path, overrides, message):
    result = train(base_args(data, tmp_path, **overrides), timeout_s=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_pseudo_perplexity_of_a_trained_checkpoint_equals_that_of_its_hf_export(reference, tmp_path):
    hf = tmp_path / "hf"
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), "--checkpoint",
                    str(reference / "checkpoints"), "--output", str(hf)], check=True, capture_output=True, timeout=120)
    scores = {}
    for source in (["--checkpoint", str(reference / "checkpoints")], ["--hf", str(hf)]):
        result = subprocess.run([sys.executable, str(ROOT / "tools" / "pseudo_perplexity.py"), *source, "--input",
                                 str(EXAMPLE_CORPUS), "--max-docs", "2", "--max-length", "48"],
                                check=True, capture_output=True, text=True, timeout=300)
        scores[source[0]] = json.loads(result.stdout.splitlines()[-1])
    assert scores["--hf"]["tokens"] == scores["--checkpoint"]["tokens"] > 0
    # fp32 on both sides; they differ only in kernel order (~1e-6 on log-probabilities)
    assert scores["--hf"]["pppl"] == pytest.approx(scores["--checkpoint"]["pppl"], rel=1e-4)


def test_pretraining_continues_from_a_hugging_face_model(data, reference, tmp_path):
    hf, imported = tmp_path / "hf", tmp_path / "imported"
    for tool, args in (("convert_to_hf.py", ["--checkpoint", str(reference / "checkpoints"), "--output", str(hf)]),
                       ("convert_from_hf.py", ["--hf", str(hf), "--output", str(imported)])):
        subprocess.run([sys.executable, str(ROOT / "tools" / tool), *args], check=True, capture_output=True,
                       timeout=120)
    run_dir = tmp_path / "run"
    train_ok(base_args(data, run_dir, **{"checkpoint.load": str(imported), "checkpoint.reset_optimizer": "true",
                                         "train.steps": 3}))
    first = [r for r in records(run_dir) if "loss" in r][0]["loss"]
    assert first < [r for r in records(reference) if "loss" in r][0]["loss"]  # the imported weights, not a fresh init


def test_two_processes_started_the_way_srun_starts_them_train_together(data, tmp_path, free_port):
    """No torchrun: each task reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and MASTER_ADDR/PORT."""
    args = base_args(data, tmp_path, **{"train.steps": 3, "checkpoint.interval": 0})
    slurm = {"SLURM_NTASKS": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port)}
    tasks = [subprocess.Popen([sys.executable, "-m", "megatron_jp.train", *args], cwd=ROOT,
                              env={**environment(), **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [task.communicate(timeout=300) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs[0][1][-3000:]
    assert [r["step"] for r in records(tmp_path) if "loss" in r] == [1, 2, 3]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "iter_0000003"
