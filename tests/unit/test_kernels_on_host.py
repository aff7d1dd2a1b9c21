"""The csrc/ CUDA kernels (rope, glu, qkv_rope), compiled for the host from their own .cu source
(csrc/host/, built by setup.py as megatron_jp._host_kernels), against the pure-torch references,
forward and backward: every dtype, the 16-byte vector path and the scalar path, head_dim 32 to 256
and one whose half is no multiple of any vector width, GQA ratios 1/2/4/8 and MQA, with and without
bias, positions restarting per packed document, one token and several waves of the grid-stride loop.

Tolerances (the oracle is the reference in fp32 on the upcast inputs, as tests/gpu does):
- the kernels compute in fp32 and round once to the dtype: rtol = the dtype's unit roundoff U;
- rotary: cos/sin come from __sincosf after a Cody-Waite reduction to [-pi, pi]. CUDA's Math API
  bounds __sincosf's absolute error there by 2^-21.41 (the host stand-in errs by exactly that, see
  csrc/host/cuda_host.h); the reduction adds at most 2^-22 (two fp32 roundings of a value <= pi), the
  reference's own fp32 sin/cos 2^-23. Each output mixes two inputs (|lo| + |hi| <= 2 max|x|) through
  three fp32 roundings on each side: atol = 2 max|x| (SINCOS + 6 F32);
- glu: the device build uses --use_fast_math, where expf becomes __expf, off by at most
  2 + floor(1.173 |x|) ulp (Math API), and 1 + erf / 1 + tanh cancel to an absolute error of a few
  ulp of 1; the activation's absolute error per unit |a| is taken as ACT (|x| <= 18 inside the tanh).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import host_kernels as hk
from megatron_jp.ops.glu import glu_reference
from megatron_jp.ops.qkv_rope import qkv_rope_reference
from megatron_jp.ops.rope import rope_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
U = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff
F32 = 2.0**-24
SINCOS = 2**-21.41 + 2**-22 + 2**-23
ACT = (2 + math.floor(1.173 * 18) + 8) * F32
HEAD_DIMS = [32, 64, 128, 256, 36]  # 36: half 18 is no multiple of 4 (fp32) or 8 (bf16/fp16) lanes
HEADS = [(4, 4), (4, 2), (8, 2), (16, 2), (6, 1)]  # GQA ratio 1, 2, 4, 8; MQA
HEAD_IDS = ["gqa1", "gqa2", "gqa4", "gqa8", "mqa"]


def randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def packed_positions(B, S, seed=0):
    """Each row packs documents of random lengths, positions restarting at 0 in each."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        pos, left = [], S
        while left:
            n = int(torch.randint(1, max(2, S // 2), (1,), generator=gen).clamp(max=left))
            pos += range(n)
            left -= n
        rows.append(pos)
    return torch.tensor(rows, dtype=torch.int64)


def rotary_tol(dtype, *tensors):
    """assert_close bounds for rotated outputs of inputs bounded by max |x| (module docstring)."""
    amax = max(float(t.detach().abs().max()) for t in tensors)
    return dict(rtol=U[dtype], atol=(1 + U[dtype]) * 2 * amax * (SINCOS + 6 * F32))


def check(got, want, tol):
    """got (the kernel, in its dtype) against the fp32 oracle; NaN and unwritten outputs never pass."""
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), **tol)


def unaligned(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of x one element past a 16-byte boundary: the kernels' scalar path."""
    buffer = torch.empty(x.numel() + 1, dtype=x.dtype)
    out = buffer[1:].view(x.shape)
    out.copy_(x)
    assert out.data_ptr() % 16 != 0
    return out


# ---------------------------------------------------------------------------------------------- rope


def rope_case(lead, hq, hk_, head_dim, dtype, positions, theta=10000.0, seed=0, align=True):
    q, k = randn(*lead, hq, head_dim, dtype=dtype, seed=seed), randn(*lead, hk_, head_dim, dtype=dtype, seed=seed + 1)
    if not align:
        q, k = unaligned(q), unaligned(k)
    q32, k32 = (t.to(torch.float32, copy=True).requires_grad_(True) for t in (q, k))
    want = rope_reference(q32, k32, positions, theta)
    check_pair(hk.rope(q, k, positions, theta), want, rotary_tol(dtype, q, k))
    grads = [randn(*w.shape, dtype=dtype, seed=seed + 2 + i) for i, w in enumerate(want)]
    if not align:
        grads = [unaligned(g) for g in grads]
    want_grads = torch.autograd.grad(want, (q32, k32), [g.float() for g in grads])
    check_pair(hk.rope(*grads, positions, theta, inverse=True), want_grads, rotary_tol(dtype, *grads))


def check_pair(got, want, tol):
    for g, w in zip(got, want):
        check(g, w, tol)


@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_rope_kernel_on_host_matches_reference(dtype, head_dim, heads):
    rope_case((2, 23), *heads, head_dim, dtype, packed_positions(2, 23))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_rope_kernel_on_host_takes_the_vector_path_when_aligned_and_the_scalar_path_when_not(dtype):
    n = hk.vector_width(dtype)
    for align, width in ((True, n), (False, 1)):
        rope_case((3, 5), 2, 1, 64, dtype, packed_positions(3, 5), align=align)
        assert hk.last_blocks() == hk.expected_blocks(hk.rotary_items(15, 32, width, 3))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_rope_kernel_on_host_rotates_rows_strided_inside_a_fused_projection(dtype):
    fused = randn(3, 17, 8 + 2 * 2, 64, dtype=dtype, seed=5)
    q, k, _ = fused.split([8, 2, 2], dim=2)  # token stride 12 heads: the operand strides, not a copy
    positions = packed_positions(3, 17)
    check_pair(hk.rope(q, k, positions, 10000.0), rope_reference(q.float(), k.float(), positions, 10000.0),
               rotary_tol(dtype, q, k))


@pytest.mark.parametrize("theta", [10000.0, 160000.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_rope_kernel_on_host_matches_reference_at_positions_up_to_16k(dtype, theta):
    positions = torch.randint(0, 16384, (3, 29), generator=torch.Generator().manual_seed(7))
    rope_case((3, 29), 8, 2, 64, dtype, positions, theta=theta)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_rope_kernel_on_host_handles_one_token_and_several_waves(dtype):
    rope_case((1, 1), 8, 2, 64, dtype, torch.zeros(1, 1, dtype=torch.int64))
    tokens = 2 * hk.ITEMS_PER_WAVE // (64 // 2 // hk.vector_width(dtype)) + 7
    rope_case((tokens,), 2, 1, 64, dtype, packed_positions(1, tokens).view(tokens))
    assert hk.rotary_items(tokens, 32, hk.vector_width(dtype), 3) > 2 * hk.ITEMS_PER_WAVE
    assert hk.last_blocks() == hk.GRID_CAP  # so each thread's grid-stride loop ran three times


# ----------------------------------------------------------------------------------------------- glu


def glu_tol(dtype, x, grad=None):
    """y = act(a) * b (grad None) or grad_x (module docstring): relative terms from the roundings and
    __expf, absolute ones from the activation's cancellation, scaled by the inputs' maxima."""
    amax = float(x.float().abs().max())
    rel = U[dtype] + (2 + math.floor(1.173 * amax) + 8) * F32
    if grad is None:
        return dict(rtol=rel, atol=amax * amax * ACT)
    gmax = float(grad.float().abs().max())
    slope_error = (1 + amax * (1 + 3 * 0.044715 * amax**2)) * ACT  # d/dt of the tanh form's slope
    return dict(rtol=rel, atol=gmax * amax * (slope_error + ACT))


def glu_case(rows, width, activation, dtype, seed=0, align=True):
    x = randn(rows, 2 * width, dtype=dtype, seed=seed)
    grad = randn(rows, width, dtype=dtype, seed=seed + 1)
    if not align:
        x, grad = unaligned(x), unaligned(grad)
    x32 = x.to(torch.float32, copy=True).requires_grad_(True)
    want = glu_reference(x32, activation)
    check(hk.glu_forward(x, activation), want, glu_tol(dtype, x))
    (want_grad,) = torch.autograd.grad(want, x32, grad.float())
    check(hk.glu_backward(grad, x, activation), want_grad, glu_tol(dtype, x, grad))


@pytest.mark.parametrize("width", [64, 256, 100, 37])  # 100: 4 fp32 lanes fit, 8 do not; 37: scalar
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "geglu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_glu_kernel_on_host_matches_reference(dtype, activation, width):
    glu_case(13, width, activation, dtype)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "geglu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_glu_kernel_on_host_takes_the_vector_path_when_aligned_and_the_scalar_path_when_not(dtype, activation):
    for align, width in ((True, hk.vector_width(dtype)), (False, 1)):
        glu_case(3, 64, activation, dtype, align=align)
        assert hk.last_blocks() == hk.expected_blocks(3 * 64 // width)


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_glu_kernel_on_host_handles_one_row_and_several_waves(dtype, activation):
    glu_case(1, 64, activation, dtype)
    rows = 2 * hk.ITEMS_PER_WAVE * hk.vector_width(dtype) // 512 + 3
    glu_case(rows, 512, activation, dtype)
    assert hk.last_blocks() == hk.GRID_CAP and rows * 512 // hk.vector_width(dtype) > 2 * hk.ITEMS_PER_WAVE


# ------------------------------------------------------------------------------------------ qkv_rope


def qkv_case(B, S, hq, hk_, head_dim, dtype, bias, positions, token_major=False, seed=0, align=True, theta=1e4):
    width = (hq + 2 * hk_) * head_dim
    qkv = randn(B, S, width, dtype=dtype, seed=seed)
    b = randn(width, dtype=dtype, seed=seed + 1) if bias else None
    if not align:
        qkv = unaligned(qkv)
    qkv32 = qkv.to(torch.float32, copy=True).requires_grad_(True)
    want = qkv_rope_reference(qkv32, None if b is None else b.float(), positions, theta, hq, hk_, head_dim,
                              token_major)
    got = hk.qkv_rope_forward(qkv, b, positions, theta, hq, hk_, head_dim, token_major)
    tol = rotary_tol(dtype, qkv.float() + (0 if b is None else b.float()))
    check_pair(got, want, tol)
    assert all(g.is_contiguous() for g in got)
    grads = [randn(*w.shape, dtype=dtype, seed=seed + 2 + i) for i, w in enumerate(want)]
    if not align:
        grads = [unaligned(g) for g in grads]
    (want_grad,) = torch.autograd.grad(want, qkv32, [g.float() for g in grads])
    check(hk.qkv_rope_backward(*grads, positions, theta, token_major), want_grad, rotary_tol(dtype, *grads))


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_qkv_rope_kernel_on_host_matches_reference(dtype, head_dim, heads, bias):
    qkv_case(2, 19, *heads, head_dim, dtype, bias, packed_positions(2, 19))


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_qkv_rope_kernel_on_host_writes_token_major_for_varlen(dtype, heads, bias):
    qkv_case(2, 19, *heads, 64, dtype, bias, packed_positions(2, 19), token_major=True)


@pytest.mark.parametrize("token_major", [False, True], ids=["head_major", "token_major"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_qkv_rope_kernel_on_host_without_rotary_only_splits_and_adds_the_bias(dtype, token_major):
    qkv_case(2, 19, 4, 2, 64, dtype, True, None, token_major=token_major)


@pytest.mark.parametrize("token_major", [False, True], ids=["head_major", "token_major"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_qkv_rope_kernel_on_host_takes_the_vector_path_when_aligned_and_the_scalar_path_when_not(dtype, token_major):
    for align, width in ((True, hk.vector_width(dtype)), (False, 1)):
        qkv_case(1, 5, 2, 1, 64, dtype, False, packed_positions(1, 5), token_major, align=align)
        assert hk.last_blocks() == hk.expected_blocks(hk.rotary_items(5, 32, width, 4))


@pytest.mark.parametrize("token_major", [False, True], ids=["head_major", "token_major"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_qkv_rope_kernel_on_host_handles_one_token_and_several_waves(dtype, token_major):
    qkv_case(1, 1, 8, 2, 64, dtype, True, torch.zeros(1, 1, dtype=torch.int64), token_major)
    S = 2 * hk.ITEMS_PER_WAVE // (64 // 2 // hk.vector_width(dtype)) // 2 + 5
    positions = torch.randint(0, 16384, (2, S), generator=torch.Generator().manual_seed(9))
    qkv_case(2, S, 2, 1, 64, dtype, True, positions, token_major, theta=160000.0)
    assert hk.last_blocks() == hk.GRID_CAP
    assert hk.rotary_items(2 * S, 32, hk.vector_width(dtype), 4) > 2 * hk.ITEMS_PER_WAVE


def test_the_host_build_is_the_cuda_source():
    """The module compiles csrc/<family>/<family>.cu itself, not a copy (guards against a fork)."""
    from pathlib import Path

    source = (Path(__file__).resolve().parents[2] / "csrc" / "host" / "host_kernels.cpp").read_text()
    for family in ("rope", "glu", "qkv_rope"):
        assert f'#include "{family}/{family}.cu"' in source


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=IDS.get)
def test_the_host_stand_ins_round_fp32_to_bf16_and_fp16_as_torch_does(dtype):
    """from_float<T> on the host (the stand-ins for __float2bfloat16_rn / __float2half_rn): round to
    nearest even, ties, subnormals, overflow to inf, NaN; bit for bit what torch's conversion gives."""
    gen = torch.Generator().manual_seed(11)
    finfo = torch.finfo(dtype)
    samples = [torch.randn(4096, generator=gen) * 10.0 ** torch.randint(-9, 6, (4096,), generator=gen),
               torch.tensor([0.0, -0.0, finfo.max, -finfo.max, finfo.tiny, finfo.tiny / 4, 1e-30,
                             float("inf"), -float("inf"), 65520.0, 65519.0, 1.0 + 2**-11, 1.0 + 3 * 2**-11])]
    # values halfway between two representable ones: the tie must go to the even neighbour
    lo = torch.randn(2048, generator=gen).to(dtype)
    samples.append((lo.float() + (torch.nextafter(lo, torch.full_like(lo, float("inf"))).float() - lo.float()) / 2))
    x = torch.cat(samples).float().contiguous()
    out = torch.empty(x.shape, dtype=dtype)
    hk.host.round_to(x.data_ptr(), out.data_ptr(), x.numel(), hk.DTYPE_CODE[dtype])
    want = x.to(dtype)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    src, nan = torch.tensor([float("nan"), -float("nan")]), torch.zeros(2, dtype=dtype)
    hk.host.round_to(src.data_ptr(), nan.data_ptr(), 2, hk.DTYPE_CODE[dtype])
    assert nan.isnan().all()
