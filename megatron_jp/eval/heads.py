"""Task models for fine-tuning: transformers' task classes where they exist, our small heads elsewhere.

    kind             transformers class                     our head (over the backbone's hidden states)
    classification   AutoModelForSequenceClassification     CLS -> dense -> GELU -> dropout -> linear
    regression       the same with num_labels=1             the same, one output
    multiple_choice  AutoModelForMultipleChoice             the same, one score per (question, choice)
    span             AutoModelForQuestionAnswering          linear -> (start, end) per token

Our heads follow the common fine-tuning head of the seed model cards (ModernBERT-Ja: linear, GELU,
linear on the first token). Every task model returns plain logits: (B, labels), (B, choices), or
(B, S, 2); the loss is computed by the fine-tuning loop, the same way for both kinds of model.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_jp.eval.models import LoadedModel, quiet_load, accepts_token_types

AUTO_CLASSES = {"classification": "AutoModelForSequenceClassification",
                "regression": "AutoModelForSequenceClassification",
                "multiple_choice": "AutoModelForMultipleChoice",
                "span": "AutoModelForQuestionAnswering"}
MAPPINGS = {"AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
            "AutoModelForMultipleChoice": "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES",
            "AutoModelForQuestionAnswering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"}
HEAD_DROPOUT = 0.1
INIT_STD = 0.02


def native_task_class(loaded: LoadedModel, kind: str) -> str | None:
    """The transformers task class name for this model and task kind, or None (then our head runs)."""
    if loaded.encoder is not None and not loaded.native:
        return None
    auto = AUTO_CLASSES[kind]
    if loaded.info.get("auto_map"):
        return auto if auto in loaded.info["auto_map"] else None
    from transformers.models.auto import modeling_auto

    return getattr(modeling_auto, MAPPINGS[auto]).get(loaded.info.get("model_type"))


def build_task_model(loaded: LoadedModel, kind: str, num_labels: int) -> nn.Module:
    name = native_task_class(loaded, kind)
    if name is not None:
        import transformers

        model = quiet_load(getattr(transformers, AUTO_CLASSES[kind]), loaded.hf_folder(), loaded.trust_remote_code,
                            **({"num_labels": num_labels} if kind in ("classification", "regression") else {}))
        return NativeTaskModel(model, kind)
    backbone = loaded.backbone()
    hidden = backbone.config.hidden_size
    if kind == "span":
        return SpanHead(backbone, hidden)
    return FirstTokenHead(backbone, hidden, 1 if kind == "multiple_choice" else num_labels, kind)


class NativeTaskModel(nn.Module):
    """A transformers task class, returning its logits."""

    def __init__(self, model, kind: str):
        super().__init__()
        self.model, self.kind = model, kind
        self.takes_types = accepts_token_types(model)
        self.description = type(model).__name__

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {"token_type_ids": token_type_ids} if self.takes_types and token_type_ids is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        if self.kind == "span":
            return torch.stack([out.start_logits, out.end_logits], dim=-1)  # (B, S, 2)
        return out.logits


def _init_linear(layer: nn.Linear) -> nn.Linear:
    nn.init.normal_(layer.weight, std=INIT_STD)
    nn.init.zeros_(layer.bias)
    return layer


class FirstTokenHead(nn.Module):
    """Classification, regression and multiple choice from the first token's hidden state."""

    def __init__(self, backbone: nn.Module, hidden: int, outputs: int, kind: str):
        super().__init__()
        self.backbone, self.kind = backbone, kind
        self.dense = _init_linear(nn.Linear(hidden, hidden))
        self.dropout = nn.Dropout(HEAD_DROPOUT)
        self.out = _init_linear(nn.Linear(hidden, outputs))
        self.description = f"megatron_jp first-token head over {backbone.name}"

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        shape = input_ids.shape  # (B, S) or (B, choices, S)
        flat = [t.reshape(-1, shape[-1]) if t is not None else None
                for t in (input_ids, attention_mask, token_type_ids)]
        h = self.backbone(*flat)[:, 0]  # (N, H)
        logits = self.out(self.dropout(nn.functional.gelu(self.dense(self.dropout(h)))))
        return logits.view(shape[0], -1) if self.kind == "multiple_choice" else logits


class SpanHead(nn.Module):
    """Start and end logits per token."""

    def __init__(self, backbone: nn.Module, hidden: int):
        super().__init__()
        self.backbone = backbone
        self.out = _init_linear(nn.Linear(hidden, 2))
        self.description = f"megatron_jp span head over {backbone.name}"

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.out(self.backbone(input_ids, attention_mask, token_type_ids))  # (B, S, 2)
