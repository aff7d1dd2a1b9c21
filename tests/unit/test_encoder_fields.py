"""Config fields the encoder must honour: none may be silently ignored."""

import torch
import torch.nn.functional as F

from megatron_jp.models.config import preset
from megatron_jp.models.encoder import MLMHead, build_encoder
from megatron_jp.parallel.testing import synthetic_micro_batches


def test_the_transform_head_uses_the_configured_activation():
    h = torch.randn(5, 64) * 3
    for activation, approximate in (("gelu", "none"), ("gelu_tanh", "tanh")):
        cfg = preset("tiny-modernbert", vocab_size=96, head_activation=activation)
        head = MLMHead(cfg)
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.5)
        expected = head.decoder(head.norm(F.gelu(head.dense(h), approximate=approximate)))
        assert torch.equal(head(h), expected)
    # the check can tell the two apart: the forms differ on these inputs
    assert not torch.equal(F.gelu(head.dense(h)), F.gelu(head.dense(h), approximate="tanh"))


def test_attention_dropout_drops_attention_in_training_only():
    batch = synthetic_micro_batches(0, 1, 2, 32, 96)[0]
    args = (batch["input_ids"], batch["labels"], batch["segment_ids"], batch["position_ids"])
    plain = build_encoder(preset("tiny", vocab_size=96), seed=1)
    dropping = build_encoder(preset("tiny", vocab_size=96, attention_dropout=0.5), seed=1)
    with torch.no_grad():
        assert torch.equal(dropping.eval()(*args).logits, plain.eval()(*args).logits)
        torch.manual_seed(0)
        first = dropping.train()(*args).logits
        second = dropping(*args).logits
        assert not torch.allclose(first, plain.train()(*args).logits)
        assert not torch.equal(first, second)  # fresh masks per forward
