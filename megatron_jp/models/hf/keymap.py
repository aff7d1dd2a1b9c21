"""Key maps between our state dict and a Hugging Face class, shared by the converters and the tests.

An `Entry` pairs one of our tensors with one or more HF tensors: several HF names mean our tensor is
their concatenation along dim 0 (q/k/v into our fused qkv, gate/up into our fused fc1). An entry with
no tensor of ours (`ours=None`) is written as zeros on export: an HF flag that covers more biases than
our model has (EuroBERT's attention_bias also gives o_proj a bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_jp.models.config import ModelConfig


@dataclass(frozen=True)
class Entry:
    ours: str | None
    hf: tuple[str, ...]
    sizes: tuple[int, ...]  # rows of each HF tensor along dim 0 (one value when not split)
    shape: tuple[int, ...] = ()  # only for ours=None: the shape of the zeros written


def one(ours: str, hf: str) -> Entry:
    return Entry(ours, (hf,), (-1,))


def split(ours: str, hf: tuple[str, ...], sizes: tuple[int, ...]) -> Entry:
    return Entry(ours, hf, sizes)


def qkv_sizes(cfg: ModelConfig) -> tuple[int, int, int]:
    d = cfg.head_dim
    return cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d


def to_hf_state(entries: list[Entry], ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    hf = {}
    for e in entries:
        if e.ours is None:
            hf[e.hf[0]] = torch.zeros(e.shape)
        elif len(e.hf) == 1:
            hf[e.hf[0]] = ours[e.ours]
        else:
            hf.update(zip(e.hf, ours[e.ours].split(list(e.sizes), dim=0)))
    return {k: v.detach().contiguous().clone() for k, v in hf.items()}


def from_hf_state(entries: list[Entry], hf: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    missing = [name for e in entries if e.ours is not None for name in e.hf if name not in hf]
    if missing:
        raise ValueError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                         f"is this checkpoint of the architecture its config.json names?")
    ours = {}
    for e in entries:
        if e.ours is not None:
            ours[e.ours] = torch.cat([hf[name] for name in e.hf], dim=0) if len(e.hf) > 1 else hf[e.hf[0]]
    return ours


def unmet(conditions: dict[str, bool], target: str) -> str | None:
    """None when every condition holds, else a sentence naming those that fail."""
    failed = [name for name, ok in conditions.items() if not ok]
    return f"{target} needs {', '.join(failed)}" if failed else None


def norm(cfg: ModelConfig, ours: str, hf: str) -> list[Entry]:
    """A norm's scale, and its bias when the model's LayerNorms have one."""
    names = ["weight", "bias"] if cfg.norm == "layernorm" and cfg.norm_bias else ["weight"]
    return [one(f"{ours}.{n}", f"{hf}.{n}") for n in names]


def linear(ours: str, hf: str, bias: bool) -> list[Entry]:
    return [one(f"{ours}.weight", f"{hf}.weight")] + ([one(f"{ours}.bias", f"{hf}.bias")] if bias else [])
