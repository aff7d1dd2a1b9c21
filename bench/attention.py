#!/usr/bin/env python
"""Packed-document attention, forward + backward, by kernel: varlen (FlashAttention over the
concatenated documents), flex (compiled, with our O(B * S) BlockMask), SDPA with a dense mask, and
SDPA on unpacked rows without any mask (the speed of light: no document boundaries at all).

    python bench/attention.py [--dtype bf16] [--iters 10] [--json OUT.json] [--rehearse]

Shapes are the seed models' (tohoku-bert-500m at 4,096; modernbert-ja-130m at 1,024 and 8,192,
global and local layers), documents packed as the loader packs them (random lengths, then padding).
Times are medians of CUDA-event-timed iterations after a warm-up (compilation). --rehearse runs tiny
shapes on CPU, forward only, with the kernels that exist there (SDPA, eager flex).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from megatron_jp.models import attention
from megatron_jp.models.attention import VarlenLayout, attend, block_mask, dense_mask, varlen_boundaries
from megatron_jp.parallel.testing import packed_segments

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    window: int  # 0: global


CASES = [Case("tohoku-500m global", 4, 4096, 16, 8, 64, 0),
         Case("modernbert-130m global 1k", 32, 1024, 8, 8, 64, 0),
         Case("modernbert-130m local 1k", 32, 1024, 8, 8, 64, 128),
         Case("modernbert-130m global 8k", 4, 8192, 8, 8, 64, 0),
         Case("modernbert-130m local 8k", 4, 8192, 8, 8, 64, 128)]
REHEARSAL = [Case("tiny global", 2, 256, 4, 2, 16, 0), Case("tiny local", 2, 256, 4, 4, 16, 32)]


def layouts(case: Case, seg: torch.Tensor, device, rehearse: bool) -> dict:
    out = {}
    if attention.varlen_attn is not None and device.type == "cuda":
        out["varlen"] = VarlenLayout(varlen_boundaries(seg).to(device), case.seq, case.window)
    out["flex"] = block_mask(seg.to(device), case.seq, case.window, device)
    if case.batch * case.heads * case.seq ** 2 * 4 < 40e9:  # the dense path's S x S scores must fit
        out["sdpa dense mask"] = dense_mask(seg.to(device), case.seq, case.window, device)
    if case.window == 0:
        out["sdpa no mask (unpacked)"] = None
    return out


def time_ms(fn, iters: int, device) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def bench_case(case: Case, args, device, dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    seg = packed_segments(gen, case.batch, case.seq, max_documents=max(case.seq // 512, 2))
    shape_q = (case.batch, case.heads, case.seq, case.head_dim)
    shape_kv = (case.batch, case.kv_heads, case.seq, case.head_dim)
    head_major = [torch.randn(s, device=device, dtype=dtype, requires_grad=not args.rehearse)
                  for s in (shape_q, shape_kv, shape_kv)]
    # varlen takes q, k, v token-major, as the encoder hands them over (attention.token_major)
    token_major = [t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in head_major]
    results = {}
    for name, mask in layouts(case, seg, device, args.rehearse).items():
        major = attention.token_major(mask)
        q, k, v = token_major if major else head_major

        def step():
            out = attend(q, k, v, mask, token_major=major)
            if not args.rehearse:
                out.sum().backward()
        try:
            results[name] = round(time_ms(step, args.iters, device), 3)
        except (RuntimeError, NotImplementedError, ValueError) as e:  # a kernel this torch lacks
            results[name] = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    if device.type == "cuda" and attention.varlen_attn is None:
        results["varlen"] = f"skipped: torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    return {"case": case.name, "pass": "fwd" if args.rehearse else "fwd+bwd", "ms": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--rehearse", action="store_true", help="tiny shapes on CPU, forward only")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.rehearse else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/attention.py: no CUDA device here (use --rehearse on CPU)")
        return 0
    dtype = torch.float32 if args.rehearse else DTYPES[args.dtype]
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"varlen_attn {'available' if attention.varlen_attn is not None else 'absent'}")
    rows = []
    for case in REHEARSAL if args.rehearse else CASES:
        row = bench_case(case, args, device, dtype)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
