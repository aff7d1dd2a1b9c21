"""Cheap intrinsic metrics during training (`eval.intrinsic: true`), logged with each validation.

Masked-word accuracy on the validation documents, in any tensor/pipeline/data-parallel layout:
the validation rows as the trainer packs them, whole words (the _words shard's flags) masked until
15% of each row's tokens are, every selected token replaced by [MASK], the same selection at every
evaluation (its own seed stream), so the curve moves with the weights only. Keys added to the
validation line of metrics.jsonl, named as `tools/evaluate.py intrinsic` names them:
masked_word_accuracy (every token of the word right), masked_token_accuracy, masked_word_loss (mean
cross-entropy over the masked tokens) and masked_words.

The offline command scores whole documents truncated to --max-length instead of packed rows, so
its figures are close to, not equal to, these.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from megatron_jp.config import ConfigError
from megatron_jp.data.datasets import VALID
from megatron_jp.data.loader import build_mlm_dataset
from megatron_jp.data.masking import IGNORE_INDEX, Masker, row_randoms, select_units
from megatron_jp.parallel.loss import vocab_parallel_argmax, vocab_parallel_cross_entropy
from megatron_jp.parallel.step import run_chunks, sum_over

MASK_PROB = 0.15
STREAM = 0x3A5C  # the masks' own random stream: independent of training and validation masks


def build_dataset(cfg, tokenizer):
    """The validation documents with their word flags, or None when there are none."""
    data = dataclasses.replace(cfg.data, whole_word_masking=True)
    try:
        return build_mlm_dataset(data, tokenizer, cfg.train.seed, VALID)
    except ValueError as e:
        raise ConfigError(f"eval.intrinsic needs the word flags of the validation shards: {e}") from None


class MaskedWordProbe:
    """Fixed masked-word batches of this data-parallel rank, and the metric over them."""

    def __init__(self, cfg, tokenizer, dp_rank: int, dp_size: int):
        self.dataset = build_dataset(cfg, tokenizer)
        self.masker = Masker(tokenizer.vocab_size, tokenizer.mask_id, tokenizer.special_ids, whole_word=True)
        self.mask_id, self.seed = tokenizer.mask_id, cfg.train.seed
        S, mbs = cfg.data.seq_length, cfg.train.micro_batch_size
        rows = self.dataset.num_rows(S) if self.dataset is not None else 0
        n = min(max(1, rows // (mbs * dp_size)), cfg.eval.steps) if rows else 0
        firsts = [m * mbs * dp_size + dp_rank * mbs for m in range(n)]
        self.batches = [self.batch(np.arange(f, f + mbs), S) for f in firsts]

    def batch(self, indices: np.ndarray, S: int) -> dict:
        ids, words, seg, pos = self.dataset.layout(indices, S)
        cand = self.masker.candidates(ids)
        prev = np.zeros_like(cand)
        prev[:, 1:] = cand[:, :-1]
        starts = cand & (words | ~prev)  # as the training masker
        keys = row_randoms(self.seed, STREAM, indices, S)[:, 0]
        selected = select_units(cand, starts, keys, MASK_PROB)
        prev_selected = np.zeros_like(selected)
        prev_selected[:, 1:] = selected[:, :-1]
        word_of = np.cumsum((starts | ~prev_selected)[selected]) - 1  # (N,) row-major, as the targets
        return {"input_ids": torch.from_numpy(np.where(selected, self.mask_id, ids)),
                "labels": torch.from_numpy(np.where(selected, ids, IGNORE_INDEX)),
                "segment_ids": torch.from_numpy(seg), "position_ids": torch.from_numpy(pos),
                "word_of": torch.from_numpy(word_of), "words": int(word_of[-1]) + 1 if len(word_of) else 0}

    @torch.no_grad()
    def __call__(self, model, dims) -> dict:
        if not self.batches:
            return {}
        was_training = model.training
        model.eval()
        batches = [{k: v.to(dims.device) if torch.is_tensor(v) else v for k, v in b.items()}
                   for b in self._pipeline_multiple(dims)]
        # words right, words, tokens right, tokens, loss sum
        stats = torch.zeros(5, dtype=torch.float64, device=dims.device)

        def last(m, output):
            logits = F.linear(output.features, model.decoder.weight, model.decoder.bias)  # few rows: unchunked
            right = vocab_parallel_argmax(logits, model.vocab_start, dims.tp_group) == output.targets
            losses = vocab_parallel_cross_entropy(logits, output.targets, model.vocab_start, dims.tp_group)
            wrong = torch.zeros(batches[m]["words"], dtype=torch.float64, device=dims.device)
            wrong.index_add_(0, batches[m]["word_of"], (~right).double())
            stats.add_(torch.stack([(wrong == 0).sum().double(), wrong.new_tensor(float(len(wrong))),
                                    right.sum().double(), right.new_tensor(right.numel(), dtype=torch.float64),
                                    losses.sum().double()]))
            return None

        run_chunks(model, batches, last, train=False)
        sum_over(stats, dims.pp_group, dims.dp_group)  # only last stages hold numbers; ranks saw different rows
        model.train(was_training)
        words_right, words, tokens_right, tokens, loss = stats.tolist()
        return {"masked_word_accuracy": words_right / max(words, 1),
                "masked_token_accuracy": tokens_right / max(tokens, 1),
                "masked_word_loss": loss / max(tokens, 1), "masked_words": int(words)}

    def _pipeline_multiple(self, dims) -> list[dict]:
        """Interleaved pipelining runs micro-batches in groups of pp: pad with batches predicting nothing."""
        batches = list(self.batches)
        while dims.vpp > 1 and len(batches) % dims.pp:
            empty = dict(batches[0], labels=torch.full_like(batches[0]["labels"], IGNORE_INDEX),
                         word_of=batches[0]["word_of"][:0], words=0)
            batches.append(empty)
        return batches
