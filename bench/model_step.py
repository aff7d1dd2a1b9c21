#!/usr/bin/env python
"""Forward + backward tokens/s of our encoder against the transformers class of the same
architecture and weights, side by side in one run (CPU by default).

    python bench/model_step.py [--arch llama|modernbert|all] [--hidden 256 --layers 4 --vocab 32000
                               --seq 512 --batch 8 --mask 0.15 --steps 5 --device cpu]

Both models see the same batch and the same masked positions. Ours computes logits only at the
masked positions (sparse prediction); the transformers model is used as users would, with labels.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForMaskedLM

from megatron_jp.config import preset
from megatron_jp.models.encoder import build_encoder, masked_lm_loss
from megatron_jp.models.hf import export_hf

ARCHS = {"llama": "tiny", "modernbert": "tiny-modernbert"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    return p.parse_args()


def batch(args, device):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, args.vocab, (args.batch, args.seq), generator=gen)
    labels = torch.where(torch.rand(ids.shape, generator=gen) < args.mask, ids, torch.full_like(ids, -100))
    return ids.to(device), labels.to(device)


def seconds_per_step(step, args) -> float:
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(arch: str, args) -> tuple[float, float]:
    heads = max(args.hidden // 64, 1)
    cfg = preset(ARCHS[arch], hidden_size=args.hidden, num_layers=args.layers, num_heads=heads,
                 num_kv_heads=heads if arch == "modernbert" else max(heads // 2, 1),
                 ffn_hidden_size=args.hidden * 3 if arch == "modernbert" else args.hidden * 4 * 2 // 3,
                 vocab_size=args.vocab, sliding_window=128 if arch == "modernbert" else 0)
    ours = build_encoder(cfg, seed=0, device=args.device).train()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours.state_dict(), cfg, tmp, special={"pad": 0, "cls": 1, "sep": 2, "mask": 3})  # ids in vocab
        theirs = AutoModelForMaskedLM.from_pretrained(tmp, attn_implementation="sdpa").to(args.device).train()
    ids, labels = batch(args, args.device)

    def ours_step():
        masked_lm_loss(ours(ids, labels=labels)).backward()

    def theirs_step():
        theirs(input_ids=ids, labels=labels).loss.backward()

    tokens = args.batch * args.seq
    t_theirs, t_ours = seconds_per_step(theirs_step, args), seconds_per_step(ours_step, args)
    return tokens / t_ours, tokens / t_theirs


def main():
    args = parse_args()
    torch.manual_seed(0)
    print(f"device={args.device} threads={torch.get_num_threads()} hidden={args.hidden} layers={args.layers} "
          f"vocab={args.vocab} seq={args.seq} batch={args.batch} mask={args.mask}")
    print(f"{'arch':<12}{'transformers class':<24}{'ours tok/s':>12}{'theirs tok/s':>14}{'ratio':>8}")
    for arch in ARCHS if args.arch == "all" else [args.arch]:
        ours, theirs = compare(arch, args)
        cls = "EuroBertForMaskedLM" if arch == "llama" else "ModernBertForMaskedLM"
        print(f"{arch:<12}{cls:<24}{ours:>12.0f}{theirs:>14.0f}{ours / theirs:>7.2f}x")


if __name__ == "__main__":
    main()
