"""Export to and import from Hugging Face folders: one key map per transformers class.

Native classes are tried in order (EuroBERT, ModernBERT, BERT); a configuration none of them fits is
exported with our own modeling code through `auto_map` (trust_remote_code=True).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_jp.config import ModelConfig
from megatron_jp.models.encoder import tie
from megatron_jp.models.hf import bert, custom, eurobert, modernbert
from megatron_jp.models.hf.keymap import from_hf_state, to_hf_state

NATIVE = {"eurobert": eurobert, "modernbert": modernbert, "bert": bert}
TARGETS = {**NATIVE, "custom": custom}
BY_MODEL_TYPE = {m.MODEL_TYPE: m for m in TARGETS.values()}


def choose_target(cfg: ModelConfig, name: str = "auto"):
    """The first native class that fits, else custom code; a named target must fit or we say why."""
    if name != "auto":
        if name not in TARGETS:
            raise ValueError(f"unknown export target {name!r}; choose auto or one of {', '.join(TARGETS)}")
        reason = TARGETS[name].unsupported(cfg)
        if reason:
            raise ValueError(f"this model cannot be exported as {name}: {reason}")
        return TARGETS[name]
    return next((m for m in NATIVE.values() if m.unsupported(cfg) is None), custom)


def export_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | os.PathLike,
              special: dict | None = None, target: str = "auto", dtype: torch.dtype | None = None):
    """Write config.json + model.safetensors (+ modeling code for custom) into out_dir, atomically.

    `state` uses our parameter names; `special` holds token ids (pad, cls, sep, mask). Returns the
    target module used.
    """
    module = choose_target(cfg, target)
    tensors = to_hf_state(module.entries(cfg), state)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config = {k: v for k, v in module.hf_config(cfg, special or {}).items() if v is not None}
        config["torch_dtype"] = str(dtype or torch.float32).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if module is custom:
            (tmp / custom.MODELING_FILE).write_text(custom.modeling_source(), encoding="utf-8")
        if out_dir.exists():
            _merge_into(tmp, out_dir)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return module


def _merge_into(tmp: Path, out_dir: Path):
    """Replace our files in an existing folder (which may already hold tokenizer files)."""
    for f in tmp.iterdir():
        os.replace(f, out_dir / f.name)


def read_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors (pytorch_model.bin is not read: "
                                f"re-save the model with safe_serialization=True)")
    tensors = {}
    for name in files:
        tensors.update(load_file(str(hf_dir / name)))
    return tensors


def import_hf(hf_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face folder of a supported class into our ModelConfig and state dict."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} does not exist: expected a Hugging Face model folder")
    hf = json.loads(config_path.read_text())
    module = BY_MODEL_TYPE.get(hf.get("model_type"))
    if module is None:
        raise ValueError(f"{config_path}: model_type {hf.get('model_type')!r} is not supported; "
                         f"supported: {', '.join(BY_MODEL_TYPE)}")
    cfg = module.model_config(hf)
    state = from_hf_state(module.entries(cfg), read_hf_tensors(hf_dir), str(hf_dir))
    return cfg, tie(state, cfg)  # tied: the decoder is the embedding (HF files store it once)
