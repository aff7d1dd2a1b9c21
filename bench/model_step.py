#!/usr/bin/env python
"""Forward + backward tokens/s of our encoder against the transformers class of the same
architecture and weights, side by side in one run (CPU by default).

    python bench/model_step.py [--arch llama|modernbert|all] [--hidden 256 --layers 4 --vocab 32000
                               --seq 512 --batch 8 --mask 0.15 --steps 5 --device cpu --dtype fp32
                               --compile] [--json OUT.json]

Both models see the same batch and the same masked positions, and each runs at its best settings:
ours as training runs it (logits only at the masked positions, the decoder fused into the chunked
loss, prediction indices made on the host), transformers' ModernBERT with its own
sparse_prediction=True (EuroBERT has no such option: it computes every logit). --compile adds our
encoder with every block compiled (what train.compile does on CUDA) and reports the better of the
two. Steps alternate between the models, so a noisy shared machine slows both alike; the figure is
the median step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM

from megatron_jp.models.config import preset
from megatron_jp.models.encoder import build_encoder
from megatron_jp.models.hf import export_hf
from megatron_jp.parallel.compile import compile_blocks
from megatron_jp.parallel.loss import linear_cross_entropy
from megatron_jp.parallel.step import on_host

ARCHS = {"llama": ("tiny", "EuroBertForMaskedLM"), "modernbert": ("tiny-modernbert", "ModernBertForMaskedLM")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--arch", default="all", choices=[*ARCHS, "all"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mask", type=float, default=0.15)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--compile", action="store_true", help="also time our encoder with compiled blocks")
    p.add_argument("--json", help="write the rows (tokens/s of each side, their ratio) here too")
    return p.parse_args(argv)


def model_config(arch: str, args):
    heads = max(args.hidden // 64, 1)
    return preset(ARCHS[arch][0], hidden_size=args.hidden, num_layers=args.layers, num_heads=heads,
                  num_kv_heads=heads if arch == "modernbert" else max(heads // 2, 1),
                  ffn_hidden_size=args.hidden * 3 if arch == "modernbert" else args.hidden * 4 * 2 // 3,
                  vocab_size=args.vocab, sliding_window=128 if arch == "modernbert" else 0,
                  max_position_embeddings=max(args.seq, 512))


def batch(args):
    """One unpadded document per row (what both sides handle alike), 15% of positions predicted."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, args.vocab, (args.batch, args.seq), generator=gen)
    labels = torch.where(torch.rand(ids.shape, generator=gen) < args.mask, ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "labels": labels}


def our_step(model, prepared: dict, count: int):
    def step():
        out = model(prepared["input_ids"], labels=prepared["labels"], predicted=prepared["predicted"], logits=False)
        decoder = model.head.decoder
        (linear_cross_entropy(out.features, decoder.weight, decoder.bias, out.targets) / count).backward()
    return step


def their_step(model, ids, labels):
    def step():
        model(input_ids=ids, labels=labels).loss.backward()
    return step


def timed(step, device: str) -> float:
    start = time.perf_counter()
    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def alternate(steps: dict, args) -> dict[str, float]:
    """Median seconds per step of each entry, the entries taking turns step by step."""
    for step in steps.values():
        for _ in range(args.warmup):
            timed(step, args.device)
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(timed(step, args.device))
    return {name: statistics.median(t) for name, t in times.items()}


def compare(arch: str, args) -> dict[str, float]:
    cfg = model_config(arch, args)
    dtype = DTYPES[args.dtype]
    ours = build_encoder(cfg, seed=0, device=args.device, dtype=dtype).train()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours.state_dict(), cfg, tmp, special={"pad": 0, "cls": 1, "sep": 2, "mask": 3})  # ids in vocab
        extra = {"sparse_prediction": True} if arch == "modernbert" else {}
        theirs = AutoModelForMaskedLM.from_pretrained(tmp, attn_implementation="sdpa", dtype=dtype, **extra)
    theirs = theirs.to(args.device).train()
    data = batch(args)
    prepared, count = on_host(data, varlen=False)
    prepared = {k: v.to(args.device) for k, v in prepared.items()}
    steps = {"ours": our_step(ours, prepared, count),
             "theirs": their_step(theirs, prepared["input_ids"], prepared["labels"])}
    if args.compile:
        compiled = build_encoder(cfg, seed=0, device=args.device, dtype=dtype).train()
        compile_blocks(compiled)
        steps["ours compiled"] = our_step(compiled, prepared, count)
    tokens = args.batch * args.seq
    return {name: tokens / seconds for name, seconds in alternate(steps, args).items()}


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} hidden={args.hidden} "
          f"layers={args.layers} vocab={args.vocab} seq={args.seq} batch={args.batch} mask={args.mask}")
    print(f"{'arch':<12}{'transformers class':<24}{'ours tok/s':>12}{'compiled':>10}{'theirs tok/s':>14}{'ratio':>8}")
    rows = []
    for arch in ARCHS if args.arch == "all" else [args.arch]:
        speed = compare(arch, args)
        best = max(speed["ours"], speed.get("ours compiled", 0.0))
        compiled = f"{speed['ours compiled']:>10.0f}" if "ours compiled" in speed else f"{'-':>10}"
        print(f"{arch:<12}{ARCHS[arch][1]:<24}{speed['ours']:>12.0f}{compiled}{speed['theirs']:>14.0f}"
              f"{best / speed['theirs']:>7.2f}x")
        rows.append({"arch": arch, "tokens_per_second": speed, "ratio": best / speed["theirs"]})
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "dtype": args.dtype, "seq": args.seq,
                                               "batch": args.batch, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
