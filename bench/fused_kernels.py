#!/usr/bin/env python
"""Time and achieved memory bandwidth of the fused kernels (rope, qkv_rope, glu), forward and backward,
against the eager pure-torch reference and against torch.compile of that reference, at the seed
models' shapes. Prints a table and each kernel's verdict: a kernel that does not beat the compiled
reference by MIN_SPEEDUP (1.2x) on every seed shape stops being the default (megatron_jp/ops/__init__.py
KERNEL_SPEEDUP_VS_COMPILED, which this prints ready to paste). Without CUDA it times the eager and
compiled references only (the kernels need a GPU); --rehearse takes tiny shapes on CPU.

    python bench/fused_kernels.py [--dtype bf16|fp16|fp32] [--iters 50] [--repeats 5] [--no-compile]
                                  [--case tohoku-bert-500m modernbert-ja-130m] [--json OUT.json] [--rehearse]

Bandwidth counts the bytes each op must move at least (every input read once, every output written
once), so "% peak" is the share of the device's HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s)
the implementation reaches. Targets: the kernel >= 2x the eager reference and >= 70% of peak.
"backward" is timed as forward + backward minus forward, each with autograd as training runs it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_jp.ops import MIN_SPEEDUP
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
# --rehearse: the same ops and code paths at shapes a CPU times in seconds
REHEARSAL = {name: Shape(1, 64, s.q_heads, s.kv_heads, s.head_dim, 128, s.activation, s.theta)
             for name, s in CASES.items()}


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
    """Median over `repeats` of the mean time of `iters` back-to-back calls: CUDA events on a GPU,
    the wall clock on CPU."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        begin = time.perf_counter()
        for _ in range(iters):
            fn()
        if cuda:
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / iters)
        else:
            samples.append((time.perf_counter() - begin) / iters)
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


def bench_op(case: str, op: Op, args, peak: float | None, with_kernel: bool) -> tuple[list[str], dict]:
    """The table lines of one op at one shape, and its times {impl: (forward, backward) seconds}."""
    impls = {"eager": op.reference}
    if not args.no_compile:
        impls["compiled"] = torch.compile(op.reference)
    if with_kernel:
        impls["kernel"] = op.kernel
    times = {name: time_impl(fn, op, args.iters, args.repeats) for name, fn in impls.items()}
    lines = []
    for i, (pass_, nbytes) in enumerate((("forward", op.bytes_forward), ("backward", op.bytes_backward))):
        for name, t in times.items():
            lines.append(f"{case:<20}{op.name:<15}{pass_:<9}" + row(name, t[i], nbytes, peak, times["eager"][i]))
    return lines, times


def verdicts(results: list[dict]) -> dict:
    """Per kernel family: its smallest forward + backward speedup over the compiled reference across the
    seed shapes, and whether that keeps it the default (>= MIN_SPEEDUP on every shape)."""
    out = {}
    for r in results:
        t = r["seconds"]
        if "kernel" not in t or "compiled" not in t:
            continue
        speedup = sum(t["compiled"]) / max(sum(t["kernel"]), 1e-12)
        family = r["op"].split("/")[0]
        best = out.get(family, {}).get("speedup_vs_compiled", float("inf"))
        out[family] = {"speedup_vs_compiled": min(best, speedup)}
    for v in out.values():
        v["default"] = v["speedup_vs_compiled"] >= MIN_SPEEDUP
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--case", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--json", help="write the times and the verdicts here too")
    p.add_argument("--rehearse", action="store_true", help="tiny shapes on CPU: the references only")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.rehearse
    missing = [m.__name__ for m in (rope_module, qkv_module, glu_module) if m._EXT is None]
    if cuda and missing:
        print(f"bench/fused_kernels.py: CUDA extensions not built for {', '.join(missing)}; "
              "build them with `pip install --no-build-isolation -e .` (the 'kernel' rows would time the reference)")
        return 1
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else "cpu (no kernel rows: the fused kernels need CUDA)"
    peak = peak_bandwidth(name) if cuda else None
    peak_text = f"{peak / 1e12:.2f} TB/s" if peak else "unknown: no % of peak"
    print(f"device: {name} (HBM peak {peak_text}), dtype {args.dtype}, torch {torch.__version__}")
    print(f"{'case':<20}{'op':<15}{'pass':<9}{'impl':<10}{'time_us':>10}{'GB/s':>10}{'%peak':>9}{'vs eager':>10}")
    dtype = DTYPES[args.dtype]
    results = []
    for case in args.case:
        shape = (REHEARSAL if args.rehearse else CASES)[case]
        for make in (rope_op, qkv_rope_op, glu_op):
            op = make(shape, dtype, device)
            lines, times = bench_op(case, op, args, peak, with_kernel=cuda)
            print("\n".join(lines), flush=True)
            results.append({"case": case, "op": op.name, "seconds": times})
    summary = {"device": name, "dtype": args.dtype, "torch": torch.__version__, "results": results,
               "verdicts": verdicts(results), "min_speedup": MIN_SPEEDUP}
    report_verdicts(summary["verdicts"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


def report_verdicts(found: dict) -> None:
    if not found:
        print("verdicts: none (no kernel rows, or --no-compile); the kernels stay the default")
        return
    for family, v in found.items():
        keep = "stays the default" if v["default"] else f"loses the default (< {MIN_SPEEDUP}x): the reference runs"
        print(f"verdict: {family} kernel {v['speedup_vs_compiled']:.2f}x the compiled reference -> {keep}")
    figures = {family: round(v["speedup_vs_compiled"], 2) for family, v in found.items()}
    print(f"paste into megatron_jp/ops/__init__.py: KERNEL_SPEEDUP_VS_COMPILED = {figures}")


if __name__ == "__main__":
    sys.exit(main())
