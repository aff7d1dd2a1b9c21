"""Every tool answers bad input with one line naming it and exit status 2 (no traceback, nothing
written): issue 13, item 10."""

import pytest

BINARY = b"\x00\xff\xfe\x80garbage\x00"


def inputs(tmp_path):
    (tmp_path / "binary.bin").write_bytes(BINARY)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n[1, 2]\n{"step": 3}\n')
    (tmp_path / "noloss").mkdir()
    (tmp_path / "noloss" / "metrics.jsonl").write_text('{"step": 1, "valid_loss": 1.0}\n')
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{not json")
    return tmp_path


CASES = [
    ("train_tokenizer", ["--input", "{t}/missing.txt", "--model-prefix", "{t}/out/spm", "--vocab-size", "300"],
     "missing.txt"),
    ("train_tokenizer", ["--input", "{t}/binary.bin", "--model-prefix", "{t}/out/spm", "--vocab-size", "300"],
     "not UTF-8"),
    ("train_tokenizer", ["--input", "{t}/bad.jsonl", "--json-key", "text", "--model-prefix", "{t}/out/spm",
                         "--vocab-size", "300"], "bad.jsonl:2"),
    ("train_tokenizer", ["--input", "{t}/empty.jsonl", "--model-prefix", "{t}/out/spm", "--vocab-size", "300"],
     "SentencePiece cannot train"),
    ("pseudo_perplexity", ["--checkpoint", "{t}/nothing", "--input", "{t}/bad.jsonl"], "bad.jsonl:2"),
    ("pseudo_perplexity", ["--checkpoint", "{t}/nothing", "--input", "{t}/binary.bin"], "binary.bin"),
    ("pseudo_perplexity", ["--checkpoint", "{t}/nothing", "--input", "{t}/missing.jsonl"], "missing.jsonl"),
    ("pseudo_perplexity", ["--checkpoint", "{t}/nothing", "--input", "{t}/empty.jsonl"], "no document"),
    ("pseudo_perplexity", ["--hf", "{t}/hf", "--input", "{t}/bad.jsonl", "--max-docs", "1"], "config.json"),
    ("average_checkpoints", ["--checkpoints", "{t}/nothing", "--output", "{t}/out"], "nothing"),
    ("convert_to_hf", ["--checkpoint", "{t}/nothing", "--output", "{t}/out"], "nothing"),
    ("convert_from_hf", ["--hf", "{t}/hf", "--output", "{t}/out"], "not valid JSON"),
    ("convert_from_hf", ["--hf", "{t}/nothing", "--output", "{t}/out"], "does not exist"),
    ("merge_datasets", ["--input", "{t}/nothing", "--output-prefix", "{t}/out/merged"], "nothing"),
    ("plot_metrics", ["{t}/run"], "metrics.jsonl:2"),
    ("plot_metrics", ["{t}/noloss"], "nothing to plot"),
    ("plot_metrics", ["{t}/nothing"], "does not exist"),
    ("build_index", ["--config", "{t}/missing.yaml"], "missing.yaml"),
    ("build_index", ["--data.paths", "{t}/nothing", "--data.tokenizer_type", "ByteTokenizer"], "nothing"),
    ("build_index", ["--data.paths", "1 {t}/nothing extra", "--data.tokenizer_type", "ByteTokenizer"], "data.paths"),
]


@pytest.mark.parametrize("name, args, named", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_a_tool_answers_bad_input_with_one_line_and_status_2(tmp_path, tool, capsys, name, args, named):
    t = inputs(tmp_path)
    assert tool(name)([a.format(t=t) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert not (t / "out").exists() or not any((t / "out").iterdir())


@pytest.mark.parametrize("name, args", [
    ("train_tokenizer", ["--input", "x", "--model-prefix", "y", "--vocab-size", "0"]),
    ("pseudo_perplexity", ["--hf", "x", "--input", "y", "--max-length", "2"]),
    ("average_checkpoints", ["--checkpoints", "x", "--output", "y", "--iteration", "-1"]),
])
def test_out_of_range_options_are_refused_by_the_parser_with_status_2(tool, capsys, name, args):
    with pytest.raises(SystemExit) as stop:
        tool(name)(args)
    assert stop.value.code == 2 and "error:" in capsys.readouterr().err
