"""tools/evaluate.py end to end on CPU: every subcommand on a megatron_jp checkpoint (the quickstart's
`tiny` preset) and on Hugging Face exports of each class (EuroBERT, ModernBERT, BERT, our custom code),
every reported metric recomputed from predictions.jsonl with scipy / scikit-learn (eval_files).

Runs are tiny (16 examples, one epoch, max length 32): the numbers are near chance, the point is that
every path runs and that what is reported is what the predictions say. Recomputed metrics agree to
1e-9 (the same float64 formulas on the same values); embeddings of two loaders of one model to 1e-5
(float32 sums in another order).
"""

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from eval_files import (FILES, SENTENCES, predictions, recompute_pppl, recompute_retrieval, recompute_task,
                        task_records, write_jsonl, write_retrieval, write_task)
from megatron_jp.config import Config
from megatron_jp.data.tokenizers import build_tokenizer, save_hf_tokenizer
from megatron_jp.models.encoder import build_encoder
from megatron_jp.models.hf import export_hf
from megatron_jp.models.config import preset
from megatron_jp.training.checkpoint import save_model_checkpoint
from test_data_helpers import train_spm

VOCAB = 768  # the fixture tokenizer's pieces, padded
def fast(task: str) -> list[str]:
    """One epoch, batches of 8, short inputs (JSQuAD: 64, so that a window still holds an answer)."""
    return ["--epochs", "1", "--max-length", "64" if task == "jsquad" else "32", "--batch-size", "8"]



EXPORTS = ("eurobert", "modernbert", "bert", "custom")
TASK_CLASS = {  # which transformers task class each export gets (None: our own head over the encoder)
    "eurobert": {"jnli": "EuroBertForSequenceClassification", "jsts": "EuroBertForSequenceClassification",
                 "jcommonsenseqa": None, "jsquad": None},
    "modernbert": {"jnli": "ModernBertForSequenceClassification", "jsts": "ModernBertForSequenceClassification",
                   "jcommonsenseqa": "ModernBertForMultipleChoice", "jsquad": "ModernBertForQuestionAnswering"},
    "bert": {"jnli": "BertForSequenceClassification", "jsts": "BertForSequenceClassification",
             "jcommonsenseqa": "BertForMultipleChoice", "jsquad": "BertForQuestionAnswering"},
    "custom": {"jnli": None, "jsts": None, "jcommonsenseqa": None, "jsquad": None},
}
TOLERANCE = 1e-9


@pytest.fixture(scope="module")
def evaluate(tool):
    main = tool("evaluate")

    def run(*args, expect: int = 0):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main([str(a) for a in args])
        assert status == expect, err.getvalue()[-3000:]
        return json.loads(out.getvalue().splitlines()[-1]) if status == 0 else err.getvalue()

    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jglue")
    files = {task: write_task(folder, task) for task in FILES}
    files["queries"], files["corpus"], files["qrels"] = write_retrieval(folder)
    files["docs"] = write_jsonl(folder / "docs.jsonl", [{"text": "".join(SENTENCES[i:i + 3])} for i in range(6)])
    files["probes"] = write_jsonl(folder / "probes.jsonl", [{"text": "猫が窓辺で[MASK]いる。", "answer": "眠って"},
                                                            {"text": "東京[MASK]は３３３ｍです。", "answer": "タワー"}])
    return files


@pytest.fixture(scope="module")
def models(tmp_path_factory, tool):
    """A checkpoint, its EuroBERT export, and exports of the other classes (each with the tokenizer)."""
    root = tmp_path_factory.mktemp("models")
    spm = train_spm(root)
    cfg = Config(model=preset("tiny", vocab_size=VOCAB))
    cfg.data.tokenizer_type, cfg.data.tokenizer_model = "SentencePieceTokenizer", spm
    save_model_checkpoint(root / "ckpt", 5, cfg, build_encoder(cfg.model, seed=1).state_dict())
    paths = {"checkpoint": root / "ckpt", "eurobert": root / "eurobert"}
    with contextlib.redirect_stdout(io.StringIO()):
        assert tool("convert_to_hf")(["--checkpoint", str(root / "ckpt"), "--output", str(paths["eurobert"])]) == 0
    tok = build_tokenizer("SentencePieceTokenizer", spm)
    special = {"pad": tok.pad_id, "cls": tok.cls_id, "sep": tok.sep_id, "mask": tok.mask_id}
    shapes = {"modernbert": preset("tiny-modernbert", vocab_size=VOCAB, num_layers=3, sliding_window=8),
              "bert": preset("tiny-bert", vocab_size=VOCAB),
              "custom": preset("retrieva-bert-1.3b", vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                               num_kv_heads=1, ffn_hidden_size=96, max_position_embeddings=512)}
    for name, shape in shapes.items():
        paths[name] = root / name
        save_hf_tokenizer(tok, str(paths[name]))
        export_hf(build_encoder(shape, seed=2).state_dict(), shape, paths[name], special)
    return paths


def model_args(models, name):
    return ["--model", models[name], *(["--trust-remote-code"] if name == "custom" else [])]


def assert_metrics_equal(reported: dict, recomputed: dict):
    for key, value in recomputed.items():
        assert reported[key] == pytest.approx(value, abs=TOLERANCE), key


# ----------------------------------------------------------------------------- finetune


@pytest.fixture(scope="module")
def checkpoint_runs(evaluate, models, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune")
    return {task: (evaluate("finetune", *model_args(models, "checkpoint"), "--task", task, "--train", data[task],
                            "--valid", data[task], "--output", out / task, *fast(task)), out / task) for task in FILES}


@pytest.mark.parametrize("task", list(FILES))
def test_finetune_on_a_checkpoint_reports_what_its_predictions_score(checkpoint_runs, task):
    result, folder = checkpoint_runs[task]
    rows = predictions(folder)
    assert result["task"] == task and set(result) >= {"task", "metrics", "model", "config"}
    assert result["model_info"]["kind"] == "checkpoint" and result["model_info"]["step"] == 5
    assert len(rows) == 16 and all({"id", "prediction", "gold"} <= r.keys() for r in rows)
    assert_metrics_equal(result["metrics"], recompute_task(task, rows))
    assert json.loads((folder / "result.json").read_text())["metrics"] == result["metrics"]


@pytest.mark.parametrize("name", EXPORTS)
@pytest.mark.parametrize("task", ["jnli", "jsts", "jcommonsenseqa", "jsquad"])
def test_finetune_uses_transformers_task_classes_where_they_exist(evaluate, models, data, tmp_path, name, task):
    result = evaluate("finetune", *model_args(models, name), "--task", task, "--train", data[task],
                      "--valid", data[task], "--output", tmp_path, *fast(task))
    expected = TASK_CLASS[name][task]
    if expected:
        assert result["config"]["task_model"] == expected
    else:
        assert result["config"]["task_model"].startswith("megatron_jp ")
    assert_metrics_equal(result["metrics"], recompute_task(task, predictions(tmp_path)))


def test_a_checkpoint_and_its_export_fine_tune_to_the_same_predictions(evaluate, models, data, tmp_path,
                                                                        checkpoint_runs):
    evaluate("finetune", "--model", models["eurobert"], "--task", "jnli", "--train", data["jnli"],
             "--valid", data["jnli"], "--output", tmp_path, *fast("jnli"))
    assert predictions(tmp_path) == predictions(checkpoint_runs["jnli"][1])


def test_sweep_runs_the_jglue_grid_and_keeps_the_best_dev_score(evaluate, models, data, tmp_path):
    result = evaluate("finetune", "--model", models["eurobert"], "--task", "jcola", "--train", data["jcola"],
                      "--valid", data["jcola"], "--output", tmp_path, "--sweep", "--max-length", "32",
                      "--batch-size", "16", "--max-train-examples", "8")
    runs = result["sweep"]
    assert sorted((r["config"]["lr"], r["config"]["epochs"]) for r in runs) == sorted(
        (lr, e) for lr in (5e-5, 3e-5, 2e-5) for e in (3, 4))
    assert result["metrics"]["mcc"] == max(r["metrics"]["mcc"] for r in runs)
    best = result["config"]
    folder = tmp_path / "sweep" / f"lr{best['lr']:g}_ep{best['epochs']}_seed{best['seed']}"
    assert predictions(folder) == predictions(tmp_path)
    assert_metrics_equal(result["metrics"], recompute_task("jcola", predictions(tmp_path)))


# ----------------------------------------------------------------------------- intrinsic, sts, retrieval


@pytest.fixture(scope="module")
def intrinsic_runs(evaluate, models, data, tmp_path_factory):
    runs = {}
    for name in ("checkpoint", *EXPORTS):
        out = tmp_path_factory.mktemp(f"intrinsic-{name}")
        runs[name] = (evaluate("intrinsic", *model_args(models, name), "--input", data["docs"], "--output", out,
                               "--pairs", data["jsts"], "--probes", data["probes"], "--max-length", "64"), out)
    return runs


@pytest.mark.parametrize("name", ["checkpoint", *EXPORTS])
def test_intrinsic_metrics_equal_their_recomputation_from_the_predictions(intrinsic_runs, name):
    from scipy.spatial.distance import pdist

    result, folder = intrinsic_runs[name]
    m, rows = result["metrics"], predictions(folder)
    words = [r for r in rows if r["kind"] == "masked_word"]
    assert m["masked_words"] == len(words) > 0
    assert m["masked_word_accuracy"] == pytest.approx(np.mean([r["prediction"] == r["gold"] for r in words]))
    tokens = [(p == g) for r in words for p, g in zip(r["prediction"], r["gold"])]
    assert m["masked_tokens"] == len(tokens) and m["masked_token_accuracy"] == pytest.approx(np.mean(tokens))
    assert m["pppl"] == pytest.approx(recompute_pppl(rows), rel=1e-12)
    probes = [r for r in rows if r["kind"] == "fill_mask"]
    assert m["fill_mask_top3"] == pytest.approx(np.mean([r["gold"] in r["prediction"] for r in probes]))
    saved = np.load(folder / "embeddings.npz")
    unit = saved["embeddings"].astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    assert m["uniformity"] == pytest.approx(np.log(np.mean(np.exp(-2 * pdist(unit, "sqeuclidean")))), abs=1e-6)
    a, b = saved["positives"].T
    assert m["alignment"] == pytest.approx(np.mean(np.sum((unit[a] - unit[b]) ** 2, axis=1)), abs=1e-6)


def test_masked_units_are_whole_unidic_words_covering_about_15_percent(intrinsic_runs, data):
    from megatron_jp.data.segment import build_segmenter

    _, folder = intrinsic_runs["checkpoint"]
    texts = [json.loads(line)["text"] for line in data["docs"].read_text(encoding="utf-8").splitlines()]
    segmenter = build_segmenter("unidic-lite")
    rows = [r for r in predictions(folder) if r["kind"] == "masked_word"]
    for doc, text in enumerate(texts):
        starts, ends = (set(x.tolist()) for x in segmenter.spans(text))
        mine = [r for r in rows if r["id"].startswith(f"{doc}:")]
        assert mine
        for r in mine:  # a unit starts and ends on word boundaries (several words when a token spans them)
            begin = text.index(r["gold_text"])
            assert begin in starts and begin + len(r["gold_text"]) in ends, r


def test_intrinsic_pseudo_perplexity_equals_the_pseudo_perplexity_tool(intrinsic_runs, models, data, tool):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), torch.enable_grad():  # the tool turns gradients off for its process
        tool("pseudo_perplexity")(["--checkpoint", str(models["checkpoint"]), "--input", str(data["docs"]),
                                   "--max-length", "64"])
    expected = json.loads(out.getvalue().splitlines()[-1])
    metrics = intrinsic_runs["checkpoint"][0]["metrics"]
    assert metrics["pppl_tokens"] == expected["tokens"]
    # the same Encoder on the same ids (the exported tokenizer encodes as SentencePiece does) in the same
    # batches: equal but for the order of the final float64 sums
    assert metrics["pppl"] == pytest.approx(expected["pppl"], rel=1e-9)


@pytest.fixture(scope="module")
def sts_runs(evaluate, models, data, tmp_path_factory):
    runs = {}
    for name in ("checkpoint", *EXPORTS):
        out = tmp_path_factory.mktemp(f"sts-{name}")
        runs[name] = (evaluate("sts", *model_args(models, name), "--input", data["jsts"], "--output", out), out)
    return runs


@pytest.mark.parametrize("name", ["checkpoint", *EXPORTS])
def test_zero_shot_sts_reports_the_correlations_of_its_predictions(sts_runs, name):
    result, folder = sts_runs[name]
    assert_metrics_equal(result["metrics"], recompute_task("jsts", predictions(folder)))


@pytest.mark.parametrize("name", ["checkpoint", *EXPORTS])
def test_retrieval_reports_recall_mrr_and_ndcg_of_its_rankings(evaluate, models, data, tmp_path, name):
    result = evaluate("retrieval", *model_args(models, name), "--queries", data["queries"], "--corpus",
                      data["corpus"], "--qrels", data["qrels"], "--output", tmp_path, "--k", "1,3,10")
    rows = predictions(tmp_path)
    assert len(rows) == 4 and all(len(r["prediction"]) == 10 for r in rows)
    assert_metrics_equal(result["metrics"], recompute_retrieval(rows, [1, 3, 10]))


# ----------------------------------------------------------------------------- sentence-transformers


@pytest.mark.parametrize("name", ["checkpoint", *EXPORTS])
def test_the_sentence_transformers_export_reproduces_the_sts_scores(evaluate, models, sts_runs, tmp_path, name):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "st"
    result = evaluate("export-sentence-transformers", *model_args(models, name), "--output", out)
    assert result["metrics"]["max_difference"] <= 1e-5
    st = SentenceTransformer(str(out), device="cpu", trust_remote_code=name == "custom")
    rows = predictions(sts_runs[name][1])
    source = task_records("jsts")
    a = st.encode([r["sentence1"] for r in source], convert_to_tensor=True)
    b = st.encode([r["sentence2"] for r in source], convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()
    assert [r["id"] for r in rows] == [r["sentence_pair_id"] for r in source]
    np.testing.assert_allclose(cosine, [r["prediction"] for r in rows], rtol=0, atol=1e-5)
    evaluate("export-sentence-transformers", *model_args(models, name), "--output", out, expect=2)  # never overwrites


# ----------------------------------------------------------------------------- leaderboard and refusals


def test_leaderboard_tabulates_models_and_plots_a_run_against_its_steps(evaluate, models, data, tmp_path, sts_runs):
    from megatron_jp.training.checkpoint import load_model_state

    cfg, state = load_model_state(models["checkpoint"])
    ckpt = tmp_path / "run" / "checkpoints"
    outputs = []
    for step, scale in ((10, 0.5), (20, 0.25)):  # two more points of "one run"
        folder = save_model_checkpoint(ckpt, step, cfg, {k: v * scale if v.dim() > 1 else v for k, v in state.items()},
                                       into_existing=True)
        outputs.append(tmp_path / f"sts-{step}")
        evaluate("sts", "--model", folder, "--input", data["jsts"], "--output", outputs[-1])
    result = evaluate("leaderboard", *outputs, sts_runs["bert"][1], "--output", tmp_path / "board.md")
    board = json.loads((tmp_path / "board.json").read_text())
    assert board["columns"] == ["sts/pearson", "sts/spearman"] and len(board["rows"]) == 3
    assert f"{ckpt.resolve()}@10" in board["rows"] and str(models["bert"]) in board["rows"]
    markdown = (tmp_path / "board.md").read_text()
    assert markdown.startswith("| model | sts/pearson | sts/spearman |") and markdown.count("\n") == 5
    assert sorted(result["png"]) == [str(tmp_path / "board_sts_pearson.png"), str(tmp_path / "board_sts_spearman.png")]
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in result["png"])


def test_custom_code_is_refused_without_trust_remote_code(evaluate, models, data, tmp_path):
    message = evaluate("sts", "--model", models["custom"], "--input", data["jsts"], "--output", tmp_path / "o",
                       expect=2)
    assert "auto_map" in message and "--trust-remote-code" in message
    assert not (tmp_path / "o").exists()


def test_bad_input_stops_before_the_model_loads_and_writes_nothing(evaluate, models, data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = data["jnli"].read_text(encoding="utf-8").splitlines()
    lines[4] = lines[4].replace('"neutral"', '"maybe"').replace('"entailment"', '"maybe"').replace(
        '"contradiction"', '"maybe"')
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    message = evaluate("finetune", "--model", tmp_path / "no-such-model", "--task", "jnli", "--train", data["jnli"],
                       "--valid", bad, "--output", tmp_path / "o", expect=2)
    assert f"{bad}:5: label 'maybe' is not a jnli label" in message
    assert not (tmp_path / "o").exists()
    message = evaluate("sts", "--model", tmp_path / "no-such-model", "--input", data["jsts"], "--output",
                       tmp_path / "o", expect=2)
    assert "neither a Hugging Face folder" in message
