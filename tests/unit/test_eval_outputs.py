"""Issue 19, items 5 and 17: evaluation outputs. No earlier result is replaced without --overwrite,
no output is written over an input (even with --overwrite), the leaderboard refuses two results for
one model and task and lists scores, not counts, and export-sentence-transformers writes its
result.json and replaces an earlier folder whole."""

import json

import pytest

from eval_files import write_task
from megatron_jp.models.config import preset
from megatron_jp.data.tokenizers import build_tokenizer, save_hf_tokenizer
from megatron_jp.models.encoder import build_encoder
from megatron_jp.models.hf import export_hf
from test_data_helpers import train_spm
from test_evaluate import evaluate  # noqa: F401  (a fixture: runs tools/evaluate.py, returns its JSON or stderr)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    tok = build_tokenizer("SentencePieceTokenizer", train_spm(root))
    shape = preset("tiny", vocab_size=768, num_layers=1)
    save_hf_tokenizer(tok, str(root / "hf"))
    export_hf(build_encoder(shape, seed=2).state_dict(), shape, root / "hf",
              {"pad": tok.pad_id, "cls": tok.cls_id, "sep": tok.sep_id, "mask": tok.mask_id})
    return root / "hf"


@pytest.fixture(scope="module")
def jsts(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("jsts"), "jsts")


def result(folder, model: str, task: str, metrics: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps({"task": task, "metrics": metrics, "model": model}))
    return folder


def test_an_output_folder_with_earlier_results_is_refused_unless_overwrite(evaluate, hf_model, jsts, tmp_path):
    out = result(tmp_path / "out", "earlier", "sts", {"spearman": 0.5})
    before = (out / "result.json").read_text()
    message = evaluate("sts", "--model", hf_model, "--input", jsts, "--output", out, expect=2)
    assert f"--output {out} holds earlier results (result.json)" in message and "--overwrite" in message
    assert (out / "result.json").read_text() == before
    evaluate("sts", "--model", hf_model, "--input", jsts, "--output", out, "--overwrite")
    assert json.loads((out / "result.json").read_text())["model"] != "earlier"


@pytest.mark.parametrize("command", ["intrinsic", "retrieval", "finetune"])
def test_every_evaluation_refuses_earlier_results_before_loading_the_model(evaluate, tmp_path, command):
    out = result(tmp_path / "out", "earlier", command, {"x": 0.5})
    extra = {"intrinsic": ["--input", "d.jsonl"], "retrieval": ["--queries", "q", "--corpus", "c", "--qrels", "r"],
             "finetune": ["--task", "jsts", "--train", "t", "--valid", "v"]}[command]
    message = evaluate(command, "--model", tmp_path / "no-model", *extra, "--output", out, expect=2)
    assert "holds earlier results" in message


def test_an_output_that_is_also_an_input_is_refused_even_with_overwrite(evaluate, hf_model, jsts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.jsonl").write_text(jsts.read_text(encoding="utf-8"), encoding="utf-8")
    message = evaluate("sts", "--model", hf_model, "--input", out / "predictions.jsonl", "--output", out,
                       "--overwrite", expect=2)
    assert "is also an input" in message
    assert (out / "predictions.jsonl").read_text(encoding="utf-8") == jsts.read_text(encoding="utf-8")
    message = evaluate("sts", "--model", hf_model, "--input", jsts, "--output", hf_model, "--overwrite", expect=2)
    assert f"--output {hf_model}" in message and not (hf_model / "result.json").exists()


def test_leaderboard_never_writes_over_a_result_it_reads(evaluate, tmp_path):
    folder = result(tmp_path / "a", "m", "sts", {"spearman": 0.5})
    before = (folder / "result.json").read_text()
    for output in (folder / "result.json", folder / "result.md"):  # board.md itself, or board.json beside it
        message = evaluate("leaderboard", folder, "--output", output, "--overwrite", expect=2)
        assert "is also an input" in message
    assert (folder / "result.json").read_text() == before and not (folder / "result.md").exists()


def test_leaderboard_refuses_an_earlier_board_unless_overwrite(evaluate, tmp_path):
    folder = result(tmp_path / "a", "m", "sts", {"spearman": 0.5})
    evaluate("leaderboard", folder, "--output", tmp_path / "board.md")
    message = evaluate("leaderboard", folder, "--output", tmp_path / "board.md", expect=2)
    assert "earlier leaderboard" in message and "--overwrite" in message
    evaluate("leaderboard", folder, "--output", tmp_path / "board.md", "--overwrite")


def test_leaderboard_refuses_two_results_for_one_model_and_task_naming_both(evaluate, tmp_path):
    a = result(tmp_path / "a", "model-x", "sts", {"spearman": 0.5})
    b = result(tmp_path / "b", "model-x", "sts", {"spearman": 0.7})
    c = result(tmp_path / "c", "model-x", "retrieval", {"mrr@10": 0.2})
    message = evaluate("leaderboard", a, b, c, "--output", tmp_path / "board.md", expect=2)
    assert f"{a / 'result.json'} and {b / 'result.json'} both hold sts results of model-x" in message
    assert not (tmp_path / "board.md").exists()


def test_leaderboard_lists_scores_not_counts(evaluate, tmp_path):
    a = result(tmp_path / "a", "m", "retrieval", {"recall@1": 0.5, "mrr@10": 0.25, "queries": 4, "corpus": 120,
                                                  "hits": 3})
    evaluate("leaderboard", a, "--output", tmp_path / "board.md")
    assert json.loads((tmp_path / "board.json").read_text())["columns"] == ["retrieval/recall@1", "retrieval/mrr@10"]


def test_sentence_transformers_export_writes_result_json_and_replaces_a_folder_whole(evaluate, hf_model, tmp_path):
    out = tmp_path / "st"
    out.mkdir()
    (out / "pytorch_model.bin").write_bytes(b"stale weights")
    message = evaluate("export-sentence-transformers", "--model", hf_model, "--output", out, expect=2)
    assert "not empty" in message and "--overwrite" in message and (out / "pytorch_model.bin").exists()
    printed = evaluate("export-sentence-transformers", "--model", hf_model, "--output", out, "--overwrite")
    assert not (out / "pytorch_model.bin").exists()  # replaced whole, not mixed
    assert json.loads((out / "result.json").read_text())["metrics"] == printed["metrics"]
    assert [p.name for p in tmp_path.iterdir()] == ["st"]  # no temporary folder left beside it
    message = evaluate("export-sentence-transformers", "--model", hf_model, "--output", hf_model, "--overwrite",
                       expect=2)
    assert "would replace or sit inside the input" in message and (hf_model / "config.json").exists()
