"""Issue 19, item 17: pseudo-perplexity (tools/pseudo_perplexity.py and `evaluate.py intrinsic`) shows
progress on long inputs: a line on stderr at most every few seconds, none for inputs done sooner."""

import torch

from megatron_jp.eval.pseudo_perplexity import SpecialIds, pseudo_perplexity

SPECIAL = SpecialIds(cls=1, sep=2, mask=3)


def uniform(batch, positions):
    return torch.log_softmax(torch.zeros(len(batch), 16), dim=-1)


def test_pseudo_perplexity_reports_progress_per_interval_on_stderr(capsys):
    docs = [[5, 6, 7, 8]] * 3
    result = pseudo_perplexity(docs, SPECIAL, uniform, max_length=16, every_s=0.0)  # every document: a line
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["pseudo-perplexity: 1/3 documents, 4 tokens scored", "pseudo-perplexity: 2/3 documents, "
                     "8 tokens scored", "pseudo-perplexity: 3/3 documents, 12 tokens scored"]
    assert abs(result["pppl"] - 16.0) < 1e-4  # uniform over 16 ids: exp(ln 16)


def test_short_inputs_print_no_progress(capsys):
    pseudo_perplexity([[5, 6]], SPECIAL, uniform, max_length=16)
    assert capsys.readouterr().err == ""


def test_intrinsic_pseudo_perplexity_reports_progress(capsys):
    from megatron_jp.eval import intrinsic

    class Tok:
        cls_token_id, sep_token_id, mask_token_id = 1, 2, 3

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [5 + ord(c) % 8 for c in text]}

    class HF:
        def __call__(self, input_ids, attention_mask):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 16)})()

    mlm = type("MLM", (), {"model": HF()})()
    metrics, _ = intrinsic.pseudo_perplexity(mlm, Tok(), [("a", "abc"), ("b", "de")], "cpu", 16, every_s=0.0)
    assert capsys.readouterr().err.splitlines() == ["intrinsic: pseudo-perplexity: 1/2 documents, 3 tokens scored",
                                                    "intrinsic: pseudo-perplexity: 2/2 documents, 5 tokens scored"]
    assert metrics["pppl_tokens"] == 5
