"""The model under evaluation: a megatron_jp checkpoint or any Hugging Face folder, behind one object.

    with open_model(path, trust_remote_code=False) as m:
        m.tokenizer                  # a transformers fast tokenizer
        m.masked_lm()                # (input_ids, attention_mask) -> logits (B, S, V)
        m.backbone()                 # (input_ids, attention_mask, token_type_ids) -> hidden (B, S, H)
        heads.build_task_model(m, kind, n)   # a fine-tuning model (megatron_jp.eval.heads)

A checkpoint runs on our own Encoder for masked-LM scores and embeddings (the model its export
computes, to float32 rounding: tests/unit/test_hf_parity.py; with sparse prediction for
pseudo-perplexity). For fine-tuning it is exported to a temporary Hugging Face folder first
(tools/convert_to_hf.py's code), so a checkpoint and its export train the same transformers task
class and score the same; a checkpoint no native class fits gets our heads over our Encoder. A
folder with custom code (`auto_map`) is loaded only when the user passes trust_remote_code.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from megatron_jp.eval.records import EvalInputError, read_json


@dataclass
class LoadedModel:
    """A model ready for evaluation; build it with open_model()."""

    source: str
    """The path the user gave."""
    folder: Path
    """A Hugging Face folder with the tokenizer (for checkpoints a temporary folder, which gets the
    model too when a task class needs it: hf_folder())."""
    info: dict
    """kind (checkpoint | hf), architecture, and for checkpoints step and run (the checkpoint directory)."""
    device: torch.device
    """Where the model runs."""
    trust_remote_code: bool = False
    """Given by the user; needed for folders with custom code."""
    encoder: tuple | None = None
    """(ModelConfig, state dict) of a checkpoint: our own Encoder runs instead of a transformers class."""
    native: bool = False
    """A checkpoint a native transformers class fits (its fine-tuning uses the export)."""
    tokenizer: object = field(default=None, repr=False)
    """The transformers fast tokenizer of `folder`."""

    def masked_lm(self) -> nn.Module:
        """(input_ids, attention_mask) -> logits (B, S, V), in eval mode on the device."""
        if self.encoder is not None:
            model = EncoderMaskedLM(_build_encoder(*self.encoder))
        else:
            from transformers import AutoModelForMaskedLM

            model = HFMaskedLM(quiet_load(AutoModelForMaskedLM, self.folder, self.trust_remote_code))
        return model.to(self.device).eval()

    def backbone(self) -> nn.Module:
        """(input_ids, attention_mask, token_type_ids=None) -> last hidden states (B, S, H)."""
        if self.encoder is not None:
            return EncoderBackbone(_build_encoder(*self.encoder)).to(self.device)
        if self.info.get("auto_map"):
            from transformers import AutoModel

            if "AutoModel" not in self.info["auto_map"]:
                raise EvalInputError(f"{self.folder}/config.json: auto_map has no AutoModel entry, so the "
                                     f"encoder's hidden states cannot be loaded")
            return HFBackbone(quiet_load(AutoModel, self.folder, True)).to(self.device)
        from transformers import AutoModelForMaskedLM

        # the masked LM's base model: loads every tensor of an MLM export (BertModel alone would add a pooler)
        mlm = quiet_load(AutoModelForMaskedLM, self.folder, False)
        return HFBackbone(mlm.base_model).to(self.device)

    def hf_folder(self) -> Path:
        """The Hugging Face folder with the model; a checkpoint is exported into it on first use."""
        if self.encoder is not None and not (self.folder / "config.json").exists():
            from megatron_jp.models.hf import export_hf

            cfg, state = self.encoder
            t = self.tokenizer
            special = {"pad": t.pad_token_id, "cls": t.cls_token_id, "sep": t.sep_token_id, "mask": t.mask_token_id}
            export_hf(state, cfg, self.folder, special)
        return self.folder

    @property
    def hidden_size(self) -> int:
        if self.encoder is not None:
            return self.encoder[0].hidden_size
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.folder), trust_remote_code=self.trust_remote_code).hidden_size


class EncoderMaskedLM(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids, segment_ids=attention_mask.long()).logits  # padding is segment 0


class HFMaskedLM(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class EncoderBackbone(nn.Module):
    """Our Encoder without its MLM head."""

    def __init__(self, encoder):
        super().__init__()
        encoder.head = None  # the encoder then returns its final hidden states
        self.encoder = encoder
        self.config = encoder.cfg
        self.name = "megatron_jp Encoder"

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        types = token_type_ids if self.config.type_vocab_size else None
        return self.encoder(input_ids, segment_ids=attention_mask.long(), token_type_ids=types).hidden


class HFBackbone(nn.Module):
    """A transformers base model; token types only where its forward takes them."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config
        self.takes_types = accepts_token_types(model)
        self.name = type(model).__name__

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {"token_type_ids": token_type_ids} if self.takes_types and token_type_ids is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def accepts_token_types(model) -> bool:
    import inspect

    return "token_type_ids" in inspect.signature(model.forward).parameters


def _build_encoder(cfg, state):
    from megatron_jp.models.encoder import Encoder

    model = Encoder(cfg)
    model.load_state_dict(state)
    return model


@contextlib.contextmanager
def quiet_transformers():
    """No progress bars, and transformers' warnings about freshly initialised task heads or unused MLM
    heads silenced (a fine-tuning head is new by design; an embedding model drops the MLM head)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def quiet_load(auto_class, folder: Path, trust_remote_code: bool, **kwargs):
    with quiet_transformers():
        return auto_class.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kwargs)


# ----------------------------------------------------------------------------- opening


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def open_model(path: str, trust_remote_code: bool = False, device: str = "auto"):
    """A LoadedModel for a checkpoint (CKPT_DIR or iter_* folder) or a Hugging Face folder."""
    p = Path(path)
    with contextlib.ExitStack() as stack:
        if (p / "config.json").is_file():
            loaded = _from_hf(p, trust_remote_code, pick_device(device))
        elif (p / "latest").is_file() or (p / ".metadata").is_file():
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="megatron_jp_eval_")))
            loaded = _from_checkpoint(p, tmp, pick_device(device))
        else:
            raise EvalInputError(f"{path}: neither a Hugging Face folder (no config.json) nor a megatron_jp "
                                 f"checkpoint (no latest or .metadata)")
        loaded.source = str(path)
        loaded.tokenizer = load_tokenizer(loaded.folder, loaded.trust_remote_code)
        yield loaded


def _from_hf(folder: Path, trust_remote_code: bool, device) -> LoadedModel:
    config = read_json(folder / "config.json", "a Hugging Face model configuration")
    auto_map = config.get("auto_map")
    if auto_map and not trust_remote_code:
        raise EvalInputError(f"{folder}/config.json names custom modeling code (auto_map); pass "
                             f"--trust-remote-code if you trust the code in {folder}")
    info = {"kind": "hf", "architecture": (config.get("architectures") or ["?"])[0],
            "model_type": config.get("model_type")}
    if auto_map:
        info["auto_map"] = auto_map
    return LoadedModel(str(folder), folder, info, device, trust_remote_code)


def _from_checkpoint(path: Path, tmp: Path, device) -> LoadedModel:
    from megatron_jp.models.hf import choose_target, custom
    from megatron_jp.training.checkpoint import CheckpointError, load_model_state, read_meta, resolve_checkpoint

    try:
        iter_dir = resolve_checkpoint(path)
        cfg, state = load_model_state(iter_dir)
        step = int(read_meta(iter_dir).get("meta", {}).get("step", 0))
    except CheckpointError as e:
        raise EvalInputError(str(e)) from None
    _export_tokenizer(cfg, tmp)
    target = choose_target(cfg.model)
    info = {"kind": "checkpoint", "architecture": target.ARCHITECTURE, "model_type": target.MODEL_TYPE,
            "step": step, "run": str(iter_dir.parent.resolve()), "iteration": iter_dir.name}
    return LoadedModel(str(path), tmp, info, device, encoder=(cfg.model, state), native=target is not custom)


def _export_tokenizer(cfg, folder: Path) -> None:
    from megatron_jp.data.tokenizers import TokenizerError, build_tokenizer, save_hf_tokenizer

    d = cfg.data
    try:
        tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model)
    except TokenizerError as e:
        raise EvalInputError(f"the checkpoint's tokenizer: {e} (edit data.tokenizer_model in its config.yaml "
                             f"if the tokenizer moved)") from None
    save_hf_tokenizer(tokenizer, str(folder))


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise EvalInputError(f"{folder}: no tokenizer could be loaded ({e})") from None
    if not tokenizer.is_fast:
        raise EvalInputError(f"{folder}: the tokenizer is not a fast (tokenizer.json) one; evaluation maps "
                             f"answers and words through character offsets, which only fast tokenizers give")
    missing = [name for name in ("cls_token", "sep_token", "mask_token", "pad_token")
               if getattr(tokenizer, name) is None]
    if missing:
        raise EvalInputError(f"{folder}: the tokenizer has no {', '.join(missing)}; evaluation needs all four")
    return tokenizer
