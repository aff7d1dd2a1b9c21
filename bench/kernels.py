#!/usr/bin/env python
"""Time and achieved memory bandwidth of the fused kernels (rope, qkv_rope, glu), forward and backward,
against the eager pure-torch reference and against torch.compile of that reference, at the seed
models' shapes. Prints a table; on a machine without CUDA it says so and exits cleanly.

    python bench/kernels.py [--dtype bf16|fp16|fp32] [--iters 50] [--repeats 5] [--no-compile]
                            [--case tohoku-bert-500m modernbert-ja-130m]

Bandwidth counts the bytes each op must move at least (every input read once, every output written
once), so "% peak" is the share of the device's HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s)
the implementation reaches. Targets: the kernel >= 2x the eager reference and >= 70% of peak.
"backward" is timed as forward + backward minus forward, each with autograd as training runs it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_jp.ops import glu as glu_module
from megatron_jp.ops import qkv_rope as qkv_module
from megatron_jp.ops import rope as rope_module

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# HBM bandwidth by device name, most specific first (bytes/s)
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
                  ("A100-SXM4-80GB", 2.039e12), ("A100 80GB", 1.935e12), ("A100", 1.555e12)]


@dataclass
class Shape:
    """One seed model's attention/MLP shape at its pretraining micro-batch."""

    batch: int
    seq: int
    q_heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    activation: str
    theta: float


CASES = {
    # Llama encoder: hidden 1024, 16 heads / 8 KV heads of 64, SwiGLU ffn 4096, seq 4096, micro-batch 4
    "tohoku-bert-500m": Shape(4, 4096, 16, 8, 64, 4096, "swiglu", 10000.0),
    # ModernBERT: hidden 512, 8 heads of 64, GeGLU ffn 2048, seq 8192, micro-batch 1
    "modernbert-ja-130m": Shape(1, 8192, 8, 8, 64, 2048, "geglu", 160000.0),
}


@dataclass
class Op:
    """An op at one shape: its inputs, its implementations and the bytes a pass must move."""

    name: str
    inputs: tuple  # differentiable tensors first, then the rest (positions, ...)
    n_diff: int  # how many leading inputs get gradients
    kernel: Callable
    reference: Callable
    bytes_forward: int
    bytes_backward: int


def positions_for(s: Shape, device) -> torch.Tensor:
    return torch.arange(s.seq, device=device).expand(s.batch, s.seq)


def rope_op(s: Shape, dtype, device) -> Op:
    q = torch.randn(s.batch, s.seq, s.q_heads, s.head_dim, device=device, dtype=dtype)
    k = torch.randn(s.batch, s.seq, s.kv_heads, s.head_dim, device=device, dtype=dtype)
    moved = 2 * (q.numel() + k.numel()) * q.element_size()  # read q, k; write q, k
    return Op("rope", (q, k, positions_for(s, device)), 2,
              kernel=lambda q, k, p: rope_module.RopeFunction.apply(q, k, p, s.theta),
              reference=lambda q, k, p: rope_module.rope_reference(q, k, p, s.theta),
              bytes_forward=moved, bytes_backward=moved)


def qkv_rope_op(s: Shape, dtype, device) -> Op:
    width = (s.q_heads + 2 * s.kv_heads) * s.head_dim
    qkv = torch.randn(s.batch, s.seq, width, device=device, dtype=dtype)
    moved = 2 * qkv.numel() * qkv.element_size()  # read the fused row, write q, k, v (and back)
    args = (s.theta, s.q_heads, s.kv_heads, s.head_dim)
    return Op("qkv_rope", (qkv, positions_for(s, device)), 1,
              kernel=lambda x, p: qkv_module.QkvRopeFunction.apply(x, None, p, *args),
              reference=lambda x, p: qkv_module.qkv_rope_reference(x, None, p, *args),
              bytes_forward=moved, bytes_backward=moved)


def glu_op(s: Shape, dtype, device) -> Op:
    x = torch.randn(s.batch, s.seq, 2 * s.ffn, device=device, dtype=dtype)
    row = s.ffn * x.element_size()
    tokens = s.batch * s.seq
    return Op(f"glu/{s.activation}", (x,), 1,
              kernel=lambda x: glu_module.GluFunction.apply(x, s.activation),
              reference=lambda x: glu_module.glu_reference(x, s.activation),
              bytes_forward=3 * row * tokens,  # read [a; b], write y
              bytes_backward=5 * row * tokens)  # read [a; b] and grad_y, write grad_x


def seconds(fn: Callable, iters: int, repeats: int, warmup: int = 5) -> float:
    """Median over `repeats` of the mean time of `iters` back-to-back calls, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(samples)


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def time_impl(impl: Callable, op: Op, iters: int, repeats: int) -> tuple[float, float]:
    """(forward, backward) seconds: forward under no_grad, backward = (forward + backward) - forward."""
    diff = [t.detach().requires_grad_(True) for t in op.inputs[:op.n_diff]]
    rest = op.inputs[op.n_diff:]
    grads = [torch.randn_like(o) for o in as_tuple(impl(*diff, *rest))]

    def forward():
        with torch.no_grad():
            impl(*diff, *rest)

    def forward_backward():
        torch.autograd.grad(as_tuple(impl(*diff, *rest)), diff, grads)

    t_forward = seconds(forward, iters, repeats)
    return t_forward, max(seconds(forward_backward, iters, repeats) - t_forward, 0.0)


def peak_bandwidth(name: str) -> float | None:
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)


def row(impl: str, t: float, nbytes: int, peak: float | None, eager: float) -> str:
    """time, GB/s, % of peak, speedup over eager; kernel rows also say whether they meet the targets."""
    bandwidth = nbytes / t if t > 0 else float("nan")
    pct = 100 * bandwidth / peak if peak else float("nan")
    speedup = eager / t if t > 0 else float("nan")
    text = f"{impl:<10}{t * 1e6:10.1f}{bandwidth / 1e9:10.0f}{pct:8.1f}%{speedup:9.2f}x"
    if impl == "kernel":
        met = speedup >= 2 and (peak is None or pct >= 70)
        text += "  meets target" if met else "  below target (>= 2x eager, >= 70% peak)"
    return text


def bench_op(case: str, op: Op, args, peak: float | None) -> list[str]:
    impls = {"eager": op.reference}
    if not args.no_compile:
        impls["compiled"] = torch.compile(op.reference)
    impls["kernel"] = op.kernel
    times = {name: time_impl(fn, op, args.iters, args.repeats) for name, fn in impls.items()}
    lines = []
    for i, (pass_, nbytes) in enumerate((("forward", op.bytes_forward), ("backward", op.bytes_backward))):
        for name, t in times.items():
            lines.append(f"{case:<20}{op.name:<15}{pass_:<9}" + row(name, t[i], nbytes, peak, times["eager"][i]))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--case", nargs="*", default=list(CASES), choices=list(CASES))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device here; the fused kernels need one. Nothing to time.")
        return 0
    missing = [m.__name__ for m in (rope_module, qkv_module, glu_module) if m._EXT is None]
    if missing:
        print(f"bench/kernels.py: CUDA extensions not built for {', '.join(missing)}; "
              "build them with `pip install --no-build-isolation -e .` (the 'kernel' rows would time the reference)")
        return 1
    name = torch.cuda.get_device_name()
    peak = peak_bandwidth(name)
    peak_text = f"{peak / 1e12:.2f} TB/s" if peak else "unknown: no % of peak"
    print(f"device: {name} (HBM peak {peak_text}), dtype {args.dtype}, torch {torch.__version__}")
    print(f"{'case':<20}{'op':<15}{'pass':<9}{'impl':<10}{'time_us':>10}{'GB/s':>10}{'%peak':>9}{'vs eager':>10}")
    dtype = DTYPES[args.dtype]
    for case in args.case:
        shape = CASES[case]
        for make in (rope_op, qkv_rope_op, glu_op):
            for line in bench_op(case, make(shape, dtype, "cuda"), args, peak):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
