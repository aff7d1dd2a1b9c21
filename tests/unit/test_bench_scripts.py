"""The bench/ and tools/ scripts run as the README documents them (`python bench/x.py`, which puts
bench/ first on sys.path), and bench/gpu_check.sh cannot report success when a stage failed."""

import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(str(p.relative_to(ROOT)) for folder in ("bench", "tools") for p in (ROOT / folder).glob("*.py"))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")


def test_no_bench_or_tool_script_shadows_an_installed_module():
    """bench/kernels.py once hid the `kernels` package transformers 5.x imports, from every bench script."""
    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    installed |= {"kernels"}  # imported by transformers 5.x where installed (the device has it)
    clashes = sorted(s for s in SCRIPTS if Path(s).stem in installed)
    assert not clashes, f"rename these: they shadow installed modules for every script in their folder: {clashes}"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_bench_and_tool_script_answers_help_as_documented(script):
    run = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                         env=ENV, timeout=180)
    assert run.returncode == 0, f"python {script} --help failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    assert "usage" in run.stdout.lower()


# ------------------------------------------------------------------------------------ bench/gpu_check.sh


def gpu_check(tmp_path, *args, python=sys.executable, budget=None):
    env = dict(ENV, PYTHON=str(python), TMPDIR=str(tmp_path))
    if budget is not None:
        env["GPU_CHECK_BUDGET"] = str(budget)
    out = tmp_path / "out"
    run = subprocess.run(["bash", "bench/gpu_check.sh", *args, str(out)], cwd=ROOT, capture_output=True,
                         text=True, env=env, timeout=300)
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else None
    return run, out, report


def python_failing_on(tmp_path, script: str, action: str) -> Path:
    """An interpreter that runs `action` instead of `script` (a stage made to fail) and is the real
    Python for everything else, the report included."""
    shim = tmp_path / "python"
    shim.write_text(f'#!/bin/sh\ncase "$*" in *{script}*) {action} ;; esac\nexec {sys.executable} "$@"\n')
    shim.chmod(0o755)
    return shim


def test_gpu_check_rehearsal_of_a_stage_reports_it_in_two_files_and_exits_zero(tmp_path):
    run, out, report = gpu_check(tmp_path, "--rehearse", "--only", "gpu_tests")
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check_logs.tar.gz"]
    (stage,) = report["stages"]
    assert report["ok"] and stage["stage"] == "gpu_tests" and stage["status"] == "ok"
    assert "skipped" in stage["headline"]  # pytest's summary: every GPU test skips without CUDA
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        assert tar.getnames() == ["gpu_tests.log"]
    assert "1/1 stages ok" in run.stdout and "gpu_tests" in run.stdout.splitlines()[-2]


def test_gpu_check_rehearsal_exits_nonzero_when_a_stage_script_fails(tmp_path):
    broken = python_failing_on(tmp_path, "tests/gpu", "echo 'ImportError: broken on purpose' >&2; exit 1")
    run, _, report = gpu_check(tmp_path, "--rehearse", "--only", "gpu_tests", python=broken)
    assert run.returncode == 1
    (stage,) = report["stages"]
    assert not report["ok"] and stage["status"] == "failed (rc 1)"
    assert "broken on purpose" in stage["headline"] and "not ok: gpu_tests" in run.stdout


def test_gpu_check_exits_nonzero_when_a_stage_runs_out_of_time(tmp_path):
    slow = python_failing_on(tmp_path, "tests/gpu", "sleep 60")
    run, _, report = gpu_check(tmp_path, "--rehearse", "--only", "gpu_tests", python=slow, budget=6)
    assert run.returncode == 1
    assert report["stages"][0]["status"] == "timeout" and report["stages"][0]["seconds"] < 30


def test_gpu_check_report_counts_a_stage_left_without_time_as_not_ok(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check_report
    finally:
        sys.path.remove(str(ROOT / "bench"))
    (tmp_path / "stages.jsonl").write_text(
        '{"stage": "build", "rc": 0, "seconds": 3, "limit": 150}\n'
        '{"stage": "train_tohoku_4k", "rc": null, "seconds": 0, "limit": 90, "note": "no time left"}\n')
    (tmp_path / "build.log").write_text("built\n")
    assert gpu_check_report.main([str(tmp_path), str(tmp_path / "out")]) == 1
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["ok", "not run"]


def test_gpu_check_answers_help_and_refuses_an_unknown_option_with_one_error_line(tmp_path):
    usage = subprocess.run(["bash", "bench/gpu_check.sh", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert usage.returncode == 0 and "bash bench/gpu_check.sh --rehearse" in usage.stdout
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: unknown option --bogus")


def test_fused_kernels_verdict_takes_the_worst_seed_shape_against_the_compiled_reference():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import fused_kernels
    finally:
        sys.path.remove(str(ROOT / "bench"))
    results = [  # seconds (forward, backward) per implementation
        {"case": "a", "op": "glu/swiglu", "seconds": {"eager": (4, 4), "compiled": (2, 2), "kernel": (1, 1)}},
        {"case": "b", "op": "glu/geglu", "seconds": {"eager": (4, 4), "compiled": (1.1, 1.1), "kernel": (1, 1)}},
        {"case": "a", "op": "rope", "seconds": {"eager": (4, 4), "compiled": (3, 3), "kernel": (1, 1)}},
        {"case": "a", "op": "qkv_rope", "seconds": {"eager": (4, 4), "kernel": (1, 1)}},  # --no-compile: no verdict
    ]
    found = fused_kernels.verdicts(results)
    assert found == {"glu": {"speedup_vs_compiled": pytest.approx(1.1), "default": False},
                     "rope": {"speedup_vs_compiled": pytest.approx(3.0), "default": True}}


def test_train_synthetic_overrides_after_the_separator_replace_its_defaults_once(tmp_path):
    """The trainer refuses a key given twice, so gpu_check's `-- --train.precision fp8` must replace the
    bench's own train.precision rather than repeat it."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import train_synthetic
    finally:
        sys.path.remove(str(ROOT / "bench"))
    args, extra = train_synthetic.parse_args(["--preset", "tiny", "--seq", "64", "--rehearse", "--",
                                              "--train.precision", "fp8"])
    cli = train_synthetic.run_args(args, "tiny", 64, tmp_path, tmp_path / "tok", "data", extra)
    assert cli.count("--train.precision") == 1 and cli[cli.index("--train.precision") + 1] == "fp8"
