"""Every CUDA kernel family of csrc/ compiles and links on this machine, GPU or not (tools/check_csrc.py),
and the bindings it links reject bad arguments with clear messages before touching the GPU."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = sorted(d.name for d in (ROOT / "csrc").iterdir() if d.is_dir() and any(d.glob("*.cu")))
HAS_NVCC = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found: cannot compile csrc/")]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("csrc")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "check_csrc.py"), "--out", str(out)],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"tools/check_csrc.py failed:\n{result.stdout}\n{result.stderr}"
    return out


def load(out: Path, family: str):
    """The linked _<family> library, imported under its own name (not megatron_jp.ops._<family>)."""
    (path,) = out.glob(f"_{family}.*so")
    spec = importlib.util.spec_from_file_location(f"_{family}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_check(csrc: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "check_csrc.py"), "--csrc", str(csrc),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)


def test_check_csrc_fails_loudly_on_a_kernel_that_does_not_compile(tmp_path):
    (tmp_path / "csrc" / "broken").mkdir(parents=True)
    (tmp_path / "csrc" / "broken" / "broken.cu").write_text("__global__ void k(float* x) { x[0] = undeclared; }\n")
    result = run_check(tmp_path / "csrc", tmp_path / "out")
    assert result.returncode != 0
    assert "FAILED csrc/broken/broken.cu" in result.stderr and "undeclared" in result.stderr


def test_check_csrc_fails_when_a_binding_calls_a_launcher_no_kernel_defines(tmp_path):
    family = tmp_path / "csrc" / "mismatch"
    family.mkdir(parents=True)
    # the .cu defines launch(int) but the binding calls launch(long): an undefined symbol at import time
    (family / "mismatch.cu").write_text("namespace mjp { const char* launch(int) { return nullptr; } }\n")
    (family / "mismatch_binding.cpp").write_text(
        "namespace mjp { const char* launch(long); }\nconst char* call() { return mjp::launch(1L); }\n")
    result = run_check(tmp_path / "csrc", tmp_path / "out")
    assert result.returncode != 0
    assert "calls launchers no .cu defines" in result.stderr and "mjp::launch(long)" in result.stderr


def test_every_kernel_family_compiles_and_links(built):
    assert FAMILIES == ["glu", "qkv_rope", "rope"]
    for family in FAMILIES:
        assert len(list(built.glob(f"_{family}.*so"))) == 1, f"no linked library for csrc/{family}"


def rope_call(q=(2, 5, 4, 8), k=(2, 5, 2, 8), positions=(2, 5), inv_freq=4, q_dtype=torch.float32,
              k_dtype=torch.float32, pos_dtype=torch.int64):
    return lambda m: m.rope(torch.zeros(q, dtype=q_dtype), torch.zeros(k, dtype=k_dtype),
                            torch.zeros(positions, dtype=pos_dtype), torch.zeros(inv_freq), False, 0)


@pytest.mark.parametrize("call, message", [
    (rope_call(q_dtype=torch.float64, k_dtype=torch.float64), "q must be float32, bfloat16 or float16"),
    (rope_call(k_dtype=torch.bfloat16), "k is BFloat16 but q is Float"),
    (rope_call(q=(4, 8), k=(2, 8), positions=()), "at least one leading dim"),
    (rope_call(k=(2, 6, 2, 8)), "k must have q's leading dims"),
    (rope_call(k=(2, 5, 2, 6)), "q and k must share head_dim"),
    (rope_call(q=(2, 5, 4, 7), k=(2, 5, 2, 7), inv_freq=3), "head_dim must be even"),
    (rope_call(positions=(5,)), "positions must have shape"),
    (rope_call(pos_dtype=torch.float32), "positions must be an integer tensor"),
    (rope_call(inv_freq=8), "inv_freq must have shape"),
    (rope_call(), "q must be a CUDA tensor"),
])
def test_rope_binding_rejects_bad_arguments_with_a_clear_message(built, call, message):
    with pytest.raises(RuntimeError, match=message):
        call(load(built, "rope"))


@pytest.mark.parametrize("call, message", [
    (lambda m: m.forward(torch.zeros(3, 8), "relu", 0), "unknown GLU activation 'relu'"),
    (lambda m: m.forward(torch.zeros(3, 7), "swiglu", 0), "even last dim"),
    (lambda m: m.forward(torch.zeros(3, 8, dtype=torch.int32), "swiglu", 0), "x must be float32"),
    (lambda m: m.backward(torch.zeros(3, 8), torch.zeros(3, 8), "geglu", 0), "grad_y must have shape"),
    (lambda m: m.forward(torch.zeros(3, 8), "geglu_tanh", 0), "x must be a CUDA tensor"),
])
def test_glu_binding_rejects_bad_arguments_with_a_clear_message(built, call, message):
    with pytest.raises(RuntimeError, match=message):
        call(load(built, "glu"))


def qkv_call(width=(8 + 2 * 2) * 16, bias=None, positions=(2, 5), inv_freq=8):
    def call(m):
        pos = None if positions is None else torch.zeros(positions, dtype=torch.int64)
        freq = None if inv_freq is None else torch.zeros(inv_freq)
        b = None if bias is None else torch.zeros(bias)
        return m.forward(torch.zeros(2, 5, width), b, pos, freq, 8, 2, 16, False, 0)
    return call


@pytest.mark.parametrize("call, message", [
    (qkv_call(width=100), r"qkv must be \[batch, seq"),
    (qkv_call(bias=(10,)), "bias must have shape"),
    (qkv_call(inv_freq=None), "positions and inv_freq must be given together"),
    (qkv_call(positions=(2, 6)), "positions must have shape"),
    (qkv_call(), "qkv must be a CUDA tensor"),
    (lambda m: m.backward(torch.zeros(2, 8, 5, 16), torch.zeros(2, 2, 5, 16), torch.zeros(2, 2, 4, 16),
                          None, None, False, 0), "grad_v must have shape"),
    # token-major: [B, S, H, D]; a head-major grad_v is refused by shape
    (lambda m: m.backward(torch.zeros(2, 5, 8, 16), torch.zeros(2, 5, 2, 16), torch.zeros(2, 2, 5, 16),
                          None, None, True, 0), r"grad_v must have shape \[2, 5, 2, 16\]"),
    (lambda m: m.backward(torch.zeros(2, 8, 5, 16), torch.zeros(2, 2, 5, 16), torch.zeros(2, 2, 5, 16),
                          None, None, False, 0), "grad_q must be a CUDA tensor"),
])
def test_qkv_rope_binding_rejects_bad_arguments_with_a_clear_message(built, call, message):
    with pytest.raises(RuntimeError, match=message):
        call(load(built, "qkv_rope"))


@pytest.fixture
def kernel_dispatch(built, monkeypatch):
    """The op modules' kernel path forced on for CPU tensors, bound to the libraries built here: a call
    reaches the binding, which then stops at its device check."""
    from megatron_jp.ops import glu as glu_module
    from megatron_jp.ops import qkv_rope as qkv_module
    from megatron_jp.ops import rope as rope_module

    for module, family in ((rope_module, "rope"), (glu_module, "glu"), (qkv_module, "qkv_rope")):
        monkeypatch.setattr(module, "_EXT", load(built, family))
        monkeypatch.setattr(module, "_kernel_ready", lambda *args: True)
        monkeypatch.setattr(module, "cuda_stream", lambda tensor: 0)
    return rope_module, glu_module, qkv_module


def test_python_dispatch_calls_every_binding_with_the_arguments_it_declares(kernel_dispatch):
    # a wrong argument count or type would raise TypeError in pybind11 before the binding runs; reaching
    # the device check proves the Python side and the bindings agree on every signature
    rope_module, glu_module, qkv_module = kernel_dispatch
    q, k, positions = torch.zeros(2, 5, 4, 8), torch.zeros(2, 5, 2, 8), torch.zeros(2, 5, dtype=torch.long)
    calls = [
        lambda: rope_module.rope_rotate(q, k, positions, 100.0, inverse=True),
        lambda: glu_module.glu_forward(torch.zeros(3, 8), "swiglu"),
        lambda: glu_module.glu_backward(torch.zeros(3, 4), torch.zeros(3, 8), "swiglu"),
        lambda: qkv_module.qkv_rope_forward(torch.zeros(2, 5, 8 * 8), torch.zeros(8 * 8), positions, 100.0, 4, 2, 8),
        lambda: qkv_module.qkv_rope_backward(torch.zeros(2, 4, 5, 8), torch.zeros(2, 2, 5, 8),
                                             torch.zeros(2, 2, 5, 8), positions, 100.0),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
            call()
