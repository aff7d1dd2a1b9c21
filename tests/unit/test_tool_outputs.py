"""Issue 19, items 6, 7 and 12: tools that write never replace what they did not write without being
asked (--overwrite), never write over or into their own inputs, and replace a folder whole (written
beside it, then swapped in); importing a Hugging Face model never fails on the model's own shape."""

import contextlib
import io
import json
import os

import pytest

from megatron_jp.models.config import preset
from megatron_jp.data.indexed import IndexedDataset
from megatron_jp.models.encoder import build_encoder
from megatron_jp.models.hf import export_hf
from megatron_jp.training.checkpoint import save_model_checkpoint
from test_checkpoint import tiny_config
from test_data_helpers import write_shard

pytestmark = pytest.mark.usefixtures("one_thread")
DOCS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


def run(tool, name: str, *args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = tool(name)([str(a) for a in args])
    return status, err.getvalue()


@pytest.fixture
def checkpoint(tmp_path):
    cfg = tiny_config()
    save_model_checkpoint(tmp_path / "ckpt", 3, cfg, build_encoder(cfg.model, seed=1).state_dict())
    return tmp_path / "ckpt"


# ----------------------------------------------------------------------------- 6. convert_to_hf


def test_convert_to_hf_refuses_a_non_empty_folder_and_replaces_it_whole_with_overwrite(tool, checkpoint, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "pytorch_model.bin").write_bytes(b"an earlier export's weights")
    (out / "config.json").write_text('{"old": true}')
    status, err = run(tool, "convert_to_hf", "--checkpoint", checkpoint, "--output", out)
    assert status == 2 and "not empty" in err and "--overwrite" in err
    assert json.loads((out / "config.json").read_text()) == {"old": True}
    assert run(tool, "convert_to_hf", "--checkpoint", checkpoint, "--output", out, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # nothing stale mixed in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # no temporary folder left


@pytest.mark.parametrize("where", ["ckpt", "ckpt/iter_0000003", "ckpt/iter_0000003/hf", "ckpt/hf", "."])
def test_convert_to_hf_never_writes_into_or_over_a_checkpoint(tool, checkpoint, tmp_path, where):
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    status, err = run(tool, "convert_to_hf", "--checkpoint", checkpoint, "--output", tmp_path / where, "--overwrite")
    assert status == 2 and "checkpoint" in err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_convert_to_hf_refuses_another_runs_checkpoint_directory_as_output(tool, checkpoint, tmp_path):
    other = tmp_path / "other"
    save_model_checkpoint(other, 1, tiny_config(), build_encoder(tiny_config().model, seed=2).state_dict())
    status, err = run(tool, "convert_to_hf", "--checkpoint", checkpoint, "--output", other, "--overwrite")
    assert status == 2 and "holds a megatron_jp checkpoint" in err and (other / "latest").exists()


# ----------------------------------------------------------------------------- 7. merge_datasets


@pytest.fixture
def parts(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    return [write_shard(str(folder / "p0"), DOCS[:2]), write_shard(str(folder / "p1"), DOCS[2:])]


def test_merge_refuses_an_output_prefix_that_is_one_of_its_inputs(tool, parts):
    status, err = run(tool, "merge_datasets", "--input", *parts, "--output-prefix", parts[0], "--overwrite")
    assert status == 2 and "is also an input" in err
    assert len(IndexedDataset(parts[0])) == 2


def test_merge_rerun_over_a_folder_holding_its_output_does_not_double_it(tool, parts, tmp_path):
    folder, out = os.path.dirname(parts[0]), os.path.join(os.path.dirname(parts[0]), "all")
    assert run(tool, "merge_datasets", "--input", folder, "--output-prefix", out)[0] == 0
    for extra in ([], ["--overwrite"]):  # the folder now holds `all` too: as an existing output, and as an input
        status, err = run(tool, "merge_datasets", "--input", folder, "--output-prefix", out, *extra)
        assert status == 2 and ("exists: pass --overwrite" in err or "is also an input" in err), err
    assert len(IndexedDataset(out)) == 3


def test_merge_replaces_an_earlier_merged_shard_only_with_overwrite(tool, parts, tmp_path):
    out = str(tmp_path / "merged")
    assert run(tool, "merge_datasets", "--input", *parts, "--output-prefix", out)[0] == 0
    status, err = run(tool, "merge_datasets", "--input", parts[0], "--output-prefix", out)
    assert status == 2 and "--overwrite" in err and len(IndexedDataset(out)) == 3
    assert run(tool, "merge_datasets", "--input", parts[0], "--output-prefix", out, "--overwrite")[0] == 0
    assert len(IndexedDataset(out)) == 2


# ----------------------------------------------------------------------------- 12. convert_from_hf


@pytest.mark.parametrize("positions", [128, 64])
def test_a_hugging_face_bert_with_fewer_than_512_positions_imports_with_a_seq_length_it_can_take(
        tool, tmp_path, positions):
    from megatron_jp.training.checkpoint import read_config

    shape = preset("tiny-bert", vocab_size=96, max_position_embeddings=positions)
    export_hf(build_encoder(shape, seed=1).state_dict(), shape, tmp_path / "hf")
    status, err = run(tool, "convert_from_hf", "--hf", tmp_path / "hf", "--output", tmp_path / "ckpt")
    assert status == 0, err
    cfg = read_config(tmp_path / "ckpt" / "iter_0000000")
    assert cfg.data.seq_length == positions and cfg.model.max_position_embeddings == positions


def test_convert_from_hf_never_writes_into_the_folder_it_reads(tool, tmp_path):
    shape = preset("tiny-bert", vocab_size=96)
    export_hf(build_encoder(shape, seed=1).state_dict(), shape, tmp_path / "hf")
    before = sorted(p.name for p in (tmp_path / "hf").iterdir())
    status, err = run(tool, "convert_from_hf", "--hf", tmp_path / "hf", "--output", tmp_path / "hf")
    assert status == 2 and "Hugging Face folder it reads" in err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == before


# ----------------------------------------------------------------------------- the same class, other tools


def test_train_tokenizer_refuses_an_existing_tokenizer_unless_overwrite_and_never_writes_over_its_input(
        tool, tmp_path):
    from test_data_helpers import SAMPLE

    prefix = tmp_path / "spm"
    args = ["--input", SAMPLE, "--vocab-size", "800", "--model-prefix", prefix]
    assert run(tool, "train_tokenizer", *args)[0] == 0
    (prefix.parent / "spm-hf" / "vocab.txt").write_text("an earlier tokenizer's file")
    before = (prefix.parent / "spm.model").read_bytes()
    status, err = run(tool, "train_tokenizer", *args)
    assert status == 2 and "--overwrite" in err and (prefix.parent / "spm.model").read_bytes() == before
    assert run(tool, "train_tokenizer", *args, "--overwrite")[0] == 0
    assert not (prefix.parent / "spm-hf" / "vocab.txt").exists()  # the folder was replaced whole
    corpus = tmp_path / "corpus.model"
    corpus.write_bytes(open(SAMPLE, "rb").read())
    status, err = run(tool, "train_tokenizer", "--input", corpus, "--vocab-size", "800",
                      "--model-prefix", tmp_path / "corpus", "--overwrite")
    assert status == 2 and "would write over the input" in err and corpus.read_bytes() == open(SAMPLE, "rb").read()


def test_plot_metrics_never_writes_over_its_metrics_or_an_existing_file(tool, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 5.0 - s / 10}) + "\n" for s in range(1, 5)))
    before = metrics.read_text()
    status, err = run(tool, "plot_metrics", tmp_path, "--output", metrics, "--overwrite")
    assert status == 2 and "metrics file it reads" in err and metrics.read_text() == before
    (tmp_path / "figure.png").write_bytes(b"mine")
    status, err = run(tool, "plot_metrics", tmp_path, "--output", tmp_path / "figure.png")
    assert status == 2 and "--overwrite" in err and (tmp_path / "figure.png").read_bytes() == b"mine"
    assert run(tool, "plot_metrics", tmp_path, "--output", tmp_path / "figure.png", "--overwrite")[0] == 0


def test_average_checkpoints_never_writes_inside_a_checkpoint_it_reads(tool, checkpoint):
    iteration = checkpoint / "iter_0000003"
    before = sorted(p.name for p in iteration.iterdir())
    status, err = run(tool, "average_checkpoints", "--checkpoints", checkpoint, checkpoint, "--output", iteration / "avg")
    assert status == 2 and "lies inside the checkpoint it reads" in err
    assert sorted(p.name for p in iteration.iterdir()) == before
