"""eval.intrinsic: the masked-word probe the trainer runs at each validation, against a plain Encoder
and an independent reading of the word flags (the multi-process layouts: tests/integration)."""

import numpy as np
import pytest
import torch

from megatron_jp.config import Config, ConfigError
from megatron_jp.data import preprocess
from megatron_jp.data.tokenizers import ByteTokenizer
from megatron_jp.training.probe import MaskedWordProbe, build_dataset
from megatron_jp.models.encoder import build_encoder
from megatron_jp.models.config import preset
from megatron_jp.parallel import ParallelDims, build_parallel_model
from test_data_helpers import documents, write_jsonl

ONE = ParallelDims.layout(1, 1, 1)
pytestmark = pytest.mark.usefixtures("one_thread")


def shard(folder, words: bool) -> str:
    src = write_jsonl(folder / "docs.jsonl", documents(30))
    args = ["--input", src, "--output-prefix", str(folder / "docs"), "--quiet", "--tokenizer-type", "ByteTokenizer"]
    preprocess.run(preprocess.parse_args(args + (["--word-boundaries", "unidic-lite"] if words else [])))
    return str(folder / "docs_text_document")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    c = Config(model=preset("tiny", vocab_size=384, num_layers=2))
    c.data.paths, c.data.split = shard(tmp_path_factory.mktemp("shard"), words=True), "50,50"
    c.data.tokenizer_type, c.data.seq_length = "ByteTokenizer", 64
    c.train.micro_batch_size, c.eval.steps, c.eval.intrinsic = 4, 3, True
    return c


def independent_words(batch, words):
    """(word of each predicted token) from the masked positions and the shard's word-start flags."""
    labels = batch["labels"].numpy()
    out, word = [], -1
    for row in range(labels.shape[0]):
        previous = False
        for pos in range(labels.shape[1]):
            masked = labels[row, pos] != -100
            if masked and (not previous or words[row, pos]):
                word += 1
            if masked:
                out.append(word)
            previous = masked
    return np.array(out)


def test_the_probe_scores_whole_masked_words_as_a_plain_encoder_does(cfg):
    probe = MaskedWordProbe(cfg, ByteTokenizer(), dp_rank=0, dp_size=1)
    result = probe(build_parallel_model(cfg.model, ONE, seed=3), ONE)
    plain = build_encoder(cfg.model, seed=3).eval()
    dataset = build_dataset(cfg, ByteTokenizer())
    right_words = words = right_tokens = tokens = 0
    loss = 0.0
    mbs = cfg.train.micro_batch_size
    assert len(probe.batches) == 3
    for m, batch in enumerate(probe.batches):
        ids, flags, _, _ = dataset.layout(np.arange(m * mbs, (m + 1) * mbs), cfg.data.seq_length)
        masked = batch["labels"] != -100
        assert torch.equal(batch["labels"][masked], torch.from_numpy(ids)[masked])  # originals as labels
        assert (batch["input_ids"][masked] == ByteTokenizer().mask_id).all()  # every one shown as [MASK]
        budget = torch.round(0.15 * torch.from_numpy(~np.isin(ids, ByteTokenizer().special_ids)).sum(1))
        prev = torch.zeros_like(masked)
        prev[:, 1:] = masked[:, :-1]
        words_in_row = (masked & (torch.from_numpy(flags) | ~prev)).sum(1)
        # whole words up to 15% of each row; select_units always takes a row's first word, even a long one
        assert ((masked.sum(1) > 0) & ((masked.sum(1) <= budget) | (words_in_row == 1))).all()
        with torch.no_grad():
            out = plain(batch["input_ids"], batch["labels"], batch["segment_ids"], batch["position_ids"])
        right = (out.logits.argmax(-1) == out.targets).numpy()
        word_of = independent_words(batch, flags)
        for w in np.unique(word_of):
            right_words += right[word_of == w].all()
        words, right_tokens, tokens = words + len(np.unique(word_of)), right_tokens + right.sum(), tokens + right.size
        loss += torch.nn.functional.cross_entropy(out.logits, out.targets, reduction="sum").item()
    assert result["masked_words"] == words
    assert result["masked_word_accuracy"] == pytest.approx(right_words / words, abs=1e-12)
    assert result["masked_token_accuracy"] == pytest.approx(right_tokens / tokens, abs=1e-12)
    assert result["masked_word_loss"] == pytest.approx(loss / tokens, rel=1e-5)  # same math, one process


def test_the_probe_masks_the_same_words_at_every_evaluation(cfg):
    first = MaskedWordProbe(cfg, ByteTokenizer(), 0, 1).batches
    second = MaskedWordProbe(cfg, ByteTokenizer(), 0, 1).batches
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second))


def test_intrinsic_evaluation_without_word_flags_is_refused_naming_the_key(tmp_path, cfg):
    import dataclasses

    c = Config(model=cfg.model, data=dataclasses.replace(cfg.data, paths=shard(tmp_path, words=False)))
    c.eval.intrinsic = True
    with pytest.raises(ConfigError, match="eval.intrinsic needs the word flags of the validation shards.*"
                                          "--word-boundaries"):
        build_dataset(c, ByteTokenizer())
