"""Tensor-level wrappers of megatron_jp._host_kernels (the csrc/ kernels compiled for the host): what
the CUDA bindings do (views, output allocation, inv_freq), minus their checks, so the tests reach
the kernels with the layouts they choose, unaligned ones included."""

import math

import torch

import megatron_jp._host_kernels as host
from megatron_jp.ops.rope import inverse_frequencies

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ACTIVATION_CODE = {"swiglu": 0, "geglu": 1, "geglu_tanh": 2}
THREADS = 256  # csrc/common/cuda_utils.cuh kThreads
GRID_CAP = host.SMS * 2048 // THREADS * 4  # grid_blocks: 4 blocks per resident 256 threads at most
ITEMS_PER_WAVE = GRID_CAP * THREADS


def vector_width(dtype: torch.dtype) -> int:
    return 16 // torch.empty((), dtype=dtype).element_size()


def expected_blocks(items: int) -> int:
    """grid_blocks(items): one thread per item up to the cap, the grid-stride loop does the rest."""
    return max(1, min(math.ceil(items / THREADS), GRID_CAP))


def rotary_items(tokens: int, half: int, n: int, heads: int) -> int:
    """item_space() of common/rotary.cuh for a launch of vector width n on the host's pretend device."""
    target = 4 * host.SMS * 2 * THREADS  # kWavesPerLaunch * resident threads (2 blocks per SM)
    base = tokens * (half // n)
    groups = min(max(math.ceil(target / base), 1), heads)
    per_item = math.ceil(heads / groups)
    return base * math.ceil(heads / per_item)


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return inverse_frequencies(head_dim, theta).contiguous()


def rope(q, k, positions, theta, inverse=False):
    """q [..., Hq, D], k [..., Hk, D] rotated by positions [...] (inverse: by minus the angle)."""
    lead = q.shape[:-2]
    tokens, head_dim = math.prod(lead), q.shape[-1]
    rows = [x.reshape(tokens, x.shape[-2], head_dim) for x in (q, k)]
    assert all(r.stride(-1) == 1 for r in rows)
    outs = [torch.empty(x.shape, dtype=x.dtype) for x in (q, k)]
    operands = [(r.data_ptr(), o.data_ptr(), r.stride(0), r.stride(1), r.shape[1]) for r, o in zip(rows, outs)]
    pos = positions.expand(lead).to(torch.int64).contiguous()
    inv_freq = _inv_freq(head_dim, theta)
    host.rope(*operands, pos.data_ptr(), inv_freq.data_ptr(), tokens, head_dim, inverse, DTYPE_CODE[q.dtype])
    return tuple(outs)


def glu_forward(x, activation):
    assert x.is_contiguous()
    width = x.shape[-1] // 2
    y = torch.empty(*x.shape[:-1], width, dtype=x.dtype)
    host.glu_forward(x.data_ptr(), y.data_ptr(), x.numel() // (2 * width), width, ACTIVATION_CODE[activation],
                     DTYPE_CODE[x.dtype])
    return y


def glu_backward(grad, x, activation):
    assert x.is_contiguous() and grad.is_contiguous()
    width = x.shape[-1] // 2
    grad_x = torch.empty(x.shape, dtype=x.dtype)
    host.glu_backward(x.data_ptr(), grad.data_ptr(), grad_x.data_ptr(), x.numel() // (2 * width), width,
                      ACTIVATION_CODE[activation], DTYPE_CODE[x.dtype])
    return grad_x


def _attention_shape(B, S, heads, head_dim, token_major):
    return (B, S, heads, head_dim) if token_major else (B, heads, S, head_dim)


def _rotary(positions, B, S, head_dim, theta):
    if positions is None:
        return None, None
    return positions.expand(B, S).to(torch.int64).contiguous(), _inv_freq(head_dim, theta)


def qkv_rope_forward(qkv, bias, positions, theta, hq, hk, head_dim, token_major=False):
    """qkv [B, S, (Hq + 2 Hk) D] (+ bias) -> q, k, v ([B, H, S, D], or [B, S, H, D] token-major)."""
    assert qkv.is_contiguous() and (bias is None or bias.is_contiguous())
    B, S = qkv.shape[:2]
    q, k, v = (torch.empty(_attention_shape(B, S, h, head_dim, token_major), dtype=qkv.dtype) for h in (hq, hk, hk))
    pos, inv_freq = _rotary(positions, B, S, head_dim, theta)
    host.qkv_rope_forward(qkv.data_ptr(), _address(bias), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                          (B, S, hq, hk, head_dim, token_major), _address(pos), _address(inv_freq),
                          DTYPE_CODE[qkv.dtype])
    return q, k, v


def qkv_rope_backward(grad_q, grad_k, grad_v, positions, theta, token_major=False):
    """grad_q, grad_k, grad_v (the forward's layout) -> grad_qkv [B, S, (Hq + 2 Hk) D]."""
    assert all(g.is_contiguous() for g in (grad_q, grad_k, grad_v))
    head_axis = 2 if token_major else 1
    B, S = grad_q.shape[0], grad_q.shape[3 - head_axis]
    hq, hk, head_dim = grad_q.shape[head_axis], grad_k.shape[head_axis], grad_q.shape[-1]
    grad_qkv = torch.empty(B, S, (hq + 2 * hk) * head_dim, dtype=grad_q.dtype)
    pos, inv_freq = _rotary(positions, B, S, head_dim, theta)
    host.qkv_rope_backward(grad_q.data_ptr(), grad_k.data_ptr(), grad_v.data_ptr(), grad_qkv.data_ptr(),
                           (B, S, hq, hk, head_dim, token_major), _address(pos), _address(inv_freq),
                           DTYPE_CODE[grad_q.dtype])
    return grad_qkv


def last_blocks() -> int:
    return host.last_launch()[0]
