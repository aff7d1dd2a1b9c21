"""Our encoder against the transformers class it exports to, and HF -> ours -> HF round trips.

Tolerance: logits max abs diff <= 1e-4 in fp32. Both sides do the same math in a different order
(fused vs split projections, SDPA vs eager kernels); on these tiny random models logits are O(1) and
fp32 reordering costs ~1e-6, so 1e-4 leaves room while still catching any wrong wiring (a swapped
gate/up, a missing bias or a wrong RoPE theta moves logits by > 1e-2).
"""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForMaskedLM

from megatron_jp.models.config import preset
from megatron_jp.models.encoder import build_encoder
from megatron_jp.models.hf import choose_target, export_hf, import_hf

VOCAB = 96
TOLERANCE = 1e-4  # fp32 reordering costs ~1e-6 here; a wiring error moves logits by > 1e-2 (module doc)

CONFIGS = {
    "eurobert": preset("tiny", vocab_size=VOCAB, rope_theta=5000.0),
    "eurobert-qkv-bias-only": preset("tiny", vocab_size=VOCAB, qkv_bias=True, num_kv_heads=1),
    "eurobert-tied-with-bias": preset("tiny", vocab_size=VOCAB, tie_embeddings=True, mlp_bias=True,
                                      decoder_bias=True, num_layers=2),
    "modernbert": preset("tiny-modernbert", vocab_size=VOCAB, sliding_window=8),
    "modernbert-tanh-untied": preset("tiny-modernbert", vocab_size=VOCAB, activation="geglu_tanh",
                                     head_activation="gelu_tanh", tie_embeddings=False, norm_bias=True, num_layers=4),
    "bert": preset("tiny-bert", vocab_size=VOCAB, hidden_dropout=0.0, attention_dropout=0.0),
    "custom-retrieva-like": preset("retrieva-bert-1.3b", vocab_size=VOCAB, hidden_size=64, num_layers=3,
                                   num_heads=4, num_kv_heads=1, ffn_hidden_size=96, max_position_embeddings=64),
}
EXPECTED_TARGET = {"eurobert": "eurobert", "modernbert": "modernbert", "bert": "bert", "custom": "custom"}


def padded_batch(lengths, seed=0):
    """Right-padded rows of the given lengths; returns ids and the 0/1 attention mask."""
    gen = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.randint(4, VOCAB, (len(lengths), S), generator=gen)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids * mask, mask


def load_hf(path, name):
    return AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=name.startswith("custom")).eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory):
    name = request.param
    cfg = CONFIGS[name]
    ours = build_encoder(cfg, seed=7).eval()
    path = tmp_path_factory.mktemp(name) / "hf"
    export_hf(ours.state_dict(), cfg, path, special={"pad": 0, "cls": 1, "sep": 2, "mask": 3})
    return name, cfg, ours, path


def test_export_picks_the_expected_transformers_class(exported):
    name, cfg, _, _ = exported
    assert choose_target(cfg).__name__.rsplit(".", 1)[-1] == EXPECTED_TARGET[name.split("-")[0]]


@pytest.mark.parametrize("lengths", [[7], [23, 11, 23], [40, 3, 17, 40]])
def test_our_logits_match_the_exported_transformers_model(exported, lengths):
    name, cfg, ours, path = exported
    hf = load_hf(path, name)
    ids, mask = padded_batch(lengths)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, segment_ids=mask).logits
    real = mask.bool()
    diff = (got[real] - expected[real]).abs().max().item()
    assert diff <= TOLERANCE, f"{name}: max abs diff {diff:.2e} at lengths {lengths}"


def test_sparse_prediction_equals_full_logits_at_masked_positions(exported):
    _, _, ours, _ = exported
    ids, mask = padded_batch([30, 19])
    labels = torch.full_like(ids, -100)
    labels[0, [3, 9, 29]] = ids[0, [3, 9, 29]]
    labels[1, [0, 18]] = ids[1, [0, 18]]
    with torch.no_grad():
        full = ours(ids, segment_ids=mask).logits
        sparse = ours(ids, labels=labels, segment_ids=mask)
    torch.testing.assert_close(sparse.logits, full[labels != -100], rtol=0, atol=1e-5)
    assert torch.equal(sparse.targets, labels[labels != -100])


def test_export_then_import_restores_every_tensor_and_field(exported):
    name, cfg, ours, path = exported
    cfg2, state = import_hf(path)
    for key, value in ours.state_dict().items():
        assert torch.equal(state[key], value), f"{name}: {key} changed in the round trip"
    model2 = build_encoder(cfg2, device="meta")
    assert set(model2.state_dict()) == set(state)


@pytest.mark.parametrize("name", ["eurobert", "modernbert", "bert"])
def test_hf_to_ours_to_hf_round_trip_reproduces_every_tensor(name, tmp_path):
    """Start from a model transformers itself initialised and saved (its own config format)."""
    first = tmp_path / "first"
    cfg = CONFIGS[name]
    export_hf(build_encoder(cfg, seed=1).state_dict(), cfg, first)
    hf_cfg = AutoConfig.from_pretrained(first)
    torch.manual_seed(0)
    original = AutoModelForMaskedLM.from_config(hf_cfg)
    original.save_pretrained(tmp_path / "original")  # written by transformers, in its config dialect
    cfg2, state = import_hf(tmp_path / "original")
    export_hf(state, cfg2, tmp_path / "again")
    before, after = load_file(tmp_path / "original" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("name", ["modernbert", "eurobert"])
def test_flex_attention_block_masks_match_dense_masks(name):
    """The flex path (used on CUDA) against SDPA with dense masks; forward only, since flex has no CPU
    backward. Same math, different reduction order: 1e-5 in fp32."""
    cfg = CONFIGS[name]
    sdpa = build_encoder(cfg, seed=3).eval()
    flex = build_encoder(dataclasses.replace(cfg, attention_backend="flex"), seed=3).eval()
    ids, mask = padded_batch([40, 25, 33])
    segments = mask.clone()
    segments[0, 20:] = 2  # two packed documents in the first row
    with torch.no_grad():
        expected = sdpa(ids, segment_ids=segments).logits
        got = flex(ids, segment_ids=segments).logits
    real = segments > 0
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)


def test_custom_export_survives_any_import_form_in_the_encoder_source(tmp_path, monkeypatch):
    """The generated modeling file drops megatron_jp imports by syntax, not by line: a multi-line
    import (which a line filter would cut in half) still exports a model that loads and matches."""
    from megatron_jp.models import encoder as encoder_module
    from megatron_jp.models.hf import custom

    source = open(encoder_module.__file__, encoding="utf-8").read()
    assert "from megatron_jp.ops.glu import glu\n" in source
    changed = source.replace("from megatron_jp.ops.glu import glu\n",
                             "from megatron_jp.ops.glu import (  # noqa: an import over lines\n    glu,\n)\n")
    generate = custom.modeling_source
    monkeypatch.setattr(custom, "modeling_source", lambda: generate({encoder_module.__name__: changed}))
    cfg = CONFIGS["custom-retrieva-like"]
    ours = build_encoder(cfg, seed=3).eval()
    export_hf(ours.state_dict(), cfg, tmp_path / "hf", special={"pad": 0})
    assert "    glu,\n)" not in (tmp_path / "hf" / custom.MODELING_FILE).read_text()
    ids, mask = padded_batch([9, 5])
    with torch.no_grad():
        expected = load_hf(tmp_path / "hf", "custom")(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, segment_ids=mask).logits
    assert (got[mask.bool()] - expected[mask.bool()]).abs().max().item() <= TOLERANCE


def test_custom_export_refuses_a_name_it_cannot_define():
    from megatron_jp.models import encoder as encoder_module
    from megatron_jp.models.hf import custom

    source = open(encoder_module.__file__, encoding="utf-8").read()
    changed = source.replace("from megatron_jp.ops.glu import glu\n",
                             "from megatron_jp.ops.glu import glu\nfrom megatron_jp.ops.glu import glu_forward\n")
    changed = changed.replace("glu(h, self.activation)", "glu_forward(h, self.activation)")
    with pytest.raises(RuntimeError, match="lacks glu_forward"):
        custom.modeling_source({encoder_module.__name__: changed})
