"""Export to and import from Hugging Face folders: one key map per transformers class.

Native classes are tried in order (EuroBERT, ModernBERT, BERT); a configuration none of them fits is
exported with our own modeling code through `auto_map` (trust_remote_code=True).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_jp.files import move_into, output_dir, scratch_dir
from megatron_jp.models.config import ModelConfig
from megatron_jp.models.encoder import build_encoder, tie
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
              special: dict | None = None, target: str = "auto", dtype: torch.dtype | None = None,
              extra=None, replace: bool = False):
    """Write config.json + model.safetensors (+ modeling code for custom, + whatever `extra(folder)`
    writes, e.g. the tokenizer) into out_dir, atomically: everything is written into a temporary
    folder first, so a full disk leaves the old folder (or none) behind, never a half-written one.

    `state` uses our parameter names; `special` holds token ids (pad, cls, sep, mask). Returns the
    target module used. `replace`: an existing out_dir is swapped out whole (tools/convert_to_hf.py:
    no file of an earlier export stays); else it keeps files we do not write (e.g. a README).
    """
    module = choose_target(cfg, target)
    tensors = to_hf_state(module.entries(cfg), state)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    out_dir = Path(out_dir)
    with (output_dir(out_dir) if replace else scratch_dir(out_dir)) as tmp:
        config = {k: v for k, v in module.hf_config(cfg, special or {}).items() if v is not None}
        config["torch_dtype"] = str(dtype or torch.float32).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if module is custom:
            (tmp / custom.MODELING_FILE).write_text(custom.modeling_source(), encoding="utf-8")
        if extra is not None:
            extra(tmp)
        if not replace:
            move_into(tmp, out_dir)
    return module


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
        try:
            tensors.update(load_file(str(hf_dir / name)))
        except (OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{hf_dir / name}: not a readable safetensors file ({e})") from None
        except Exception as e:  # safetensors' own SafetensorError derives from Exception only
            raise ValueError(f"{hf_dir / name}: not a readable safetensors file ({e})") from None
    return tensors


def import_hf(hf_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face folder of a supported class into our ModelConfig and state dict."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} does not exist: expected a Hugging Face model folder")
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    module = BY_MODEL_TYPE.get(hf.get("model_type")) if isinstance(hf, dict) else None
    if module is None:
        raise ValueError(f"{config_path}: model_type {hf.get('model_type') if isinstance(hf, dict) else None!r} "
                         f"is not supported; supported: {', '.join(BY_MODEL_TYPE)}")
    try:
        cfg = module.model_config(hf)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{config_path}: missing or invalid key {e} for {module.ARCHITECTURE}") from None
    entries = module.entries(cfg)
    tensors = read_hf_tensors(hf_dir)
    state = from_hf_state(entries, tensors, str(hf_dir))
    _check_unused(tensors, entries, cfg, config_path)
    _check_shapes(state, entries, cfg, config_path)
    return cfg, tie(state, cfg)  # tied: the decoder is the embedding (HF files store it once)


def _check_unused(tensors: dict, entries, cfg: ModelConfig, config_path: Path):
    """Tensors no entry reads: layers beyond num_hidden_layers are refused (they would be dropped
    silently); others (a pooler, an NSP head) are named in a warning."""
    used = {name for e in entries for name in e.hf}
    unused = [name for name in tensors if name not in used]
    beyond = [n for n in unused if (m := re.search(r"\.layers?\.(\d+)\.", n)) and int(m.group(1)) >= cfg.num_layers]
    if beyond:
        raise ValueError(f"{config_path} says {cfg.num_layers} layers, but the weights hold more ({beyond[0]}, ...): "
                         f"fix num_hidden_layers; they would be dropped")
    if unused:
        warnings.warn(f"not imported (no counterpart in our model): {', '.join(unused[:6])}"
                      f"{' ...' if len(unused) > 6 else ''}", stacklevel=3)


def _check_shapes(state: dict, entries, cfg: ModelConfig, config_path: Path):
    """Every imported tensor has the shape config.json implies (else the checkpoint could not load)."""
    expected = {k: tuple(v.shape) for k, v in build_encoder(cfg, device="meta").state_dict().items()}
    hf_names = {e.ours: e.hf for e in entries if e.ours is not None}
    for name, tensor in state.items():
        want = expected.get(name)
        if want is not None and tuple(tensor.shape) != want:
            raise ValueError(f"{config_path.parent}: {' + '.join(hf_names.get(name, (name,)))} has shape "
                             f"{tuple(tensor.shape)}, but {config_path.name} implies {want} for it: the weights "
                             f"and config.json disagree")
