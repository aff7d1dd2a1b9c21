"""The transformers wrapper written into exported folders that no native class fits (auto_map).

tools/convert_to_hf.py writes this module's source after our encoder's source into one
`modeling_megatron_jp.py`, dropping the megatron_jp imports: the exported code is our encoder
verbatim, so the custom export cannot drift from the model we train.
"""

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

from megatron_jp.models.config import ModelConfig  # noqa: F401  (the export inlines these)
from megatron_jp.models.encoder import Encoder


class MegatronJpConfig(PretrainedConfig):
    """Holds our ModelConfig fields under `encoder`, plus the usual top-level names for tooling."""

    model_type = "megatron_jp_encoder"

    def __init__(self, encoder: dict | None = None, **kwargs):
        self.encoder = dict(encoder or {})
        for key in ("vocab_size", "hidden_size", "num_attention_heads"):
            if key in self.encoder:
                kwargs.setdefault(key, self.encoder[key])
        kwargs.setdefault("num_hidden_layers", self.encoder.get("num_layers", 0))
        super().__init__(**kwargs)


class MegatronJpForMaskedLM(PreTrainedModel):
    config_class = MegatronJpConfig
    base_model_prefix = "encoder"
    _supports_sdpa = True

    def __init__(self, config: MegatronJpConfig):
        super().__init__(config)
        self.encoder = Encoder(ModelConfig(**config.encoder))
        self.post_init()

    def _init_weights(self, module):
        pass  # every tensor, tied decoder included, is in model.safetensors

    def get_input_embeddings(self):
        return self.encoder.embeddings.tok

    def get_output_embeddings(self):
        return self.encoder.head.decoder

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                **kwargs):
        # padding is segment 0: real tokens never attend to it
        segment_ids = attention_mask.long() if attention_mask is not None else None
        logits = self.encoder(input_ids, segment_ids=segment_ids, position_ids=position_ids,
                              token_type_ids=token_type_ids).logits  # (B, S, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)


class MegatronJpModel(MegatronJpForMaskedLM):
    """The encoder without its MLM head (AutoModel): the last hidden states, for sentence embeddings
    (sentence-transformers) and task heads. Loads the same folder; the head's tensors are unused."""

    _keys_to_ignore_on_load_unexpected = [r"encoder\.head\."]

    def __init__(self, config: MegatronJpConfig):
        super().__init__(config)
        self.encoder.head = None  # the encoder then returns its final hidden states

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, **kwargs):
        segment_ids = attention_mask.long() if attention_mask is not None else None
        hidden = self.encoder(input_ids, segment_ids=segment_ids, position_ids=position_ids,
                              token_type_ids=token_type_ids).hidden  # (B, S, H)
        return BaseModelOutput(last_hidden_state=hidden)


__all__ = ["MegatronJpConfig", "MegatronJpForMaskedLM", "MegatronJpModel", "torch"]
