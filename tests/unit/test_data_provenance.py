"""Shard provenance: sidecars written by preprocess, checked by training and merge; token ids outside the
vocabulary refused naming the document; zero-token documents counted and dropped or kept; array-job
slices merged equal to one run byte for byte."""

import json
import os

import numpy as np
import pytest

from megatron_jp.data import preprocess, provenance
from megatron_jp.data.indexed import IndexedDataset
from megatron_jp.data.loader import build_data_loaders
from megatron_jp.data.sources import DataError
from megatron_jp.data.tokenizers import ByteTokenizer
from test_data_helpers import documents, loader_config, write_jsonl, write_shard

TOK = ByteTokenizer()


def run_preprocess(tmp_path, inputs, prefix, *extra):
    args = preprocess.parse_args(["--input", *map(str, inputs), "--output-prefix", str(prefix), "--quiet",
                                  "--tokenizer-type", "ByteTokenizer", *extra])
    return preprocess.run(args)


@pytest.fixture
def byte_shard(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", documents(40))
    run_preprocess(tmp_path, [src], tmp_path / "a")
    return str(tmp_path / "a_text_document")


def config(paths, cache_dir, **kw):
    return loader_config(paths, cache_dir, **{"split": "100,0", **kw})


def train_loader(cfg):
    return build_data_loaders(cfg, TOK, micro_batch_size=4, dp_rank=0, dp_size=1, seed=1)[0]


def edit_sidecar(prefix, **changes):
    path = provenance.sidecar_path(prefix)
    record = json.loads(open(path).read())
    record["tokenizer"].update(changes)
    open(path, "w").write(json.dumps(record))


def test_preprocess_writes_a_sidecar_naming_the_tokenizer_and_counting_the_shard(byte_shard):
    record = provenance.read_sidecar(byte_shard)
    shard = IndexedDataset(byte_shard)
    assert record["tokenizer"] == provenance.tokenizer_info(TOK) and record["tokenizer"]["vocab_size"] == 261
    assert record["documents"] == len(shard) == 40 and record["tokens"] == shard.n_tokens
    assert record["zero_token_documents"] == 0 and record["dtype"] == "uint16" and record["word_boundaries"] == "none"


def test_sidecar_hashes_the_tokenizer_file(tmp_path):
    from test_data_helpers import train_spm
    from megatron_jp.data.tokenizers import build_tokenizer

    model = train_spm(tmp_path)
    info = provenance.tokenizer_info(build_tokenizer("SentencePieceTokenizer", model))
    assert info["file"] == "spm.model" and len(info["sha256"]) == 64 and info["special_ids"]["mask"] >= 0


def test_training_refuses_a_shard_of_another_tokenizer_naming_both(byte_shard, tmp_path):
    edit_sidecar(byte_shard, type="SentencePieceTokenizer", file="other.model", sha256="ab" * 32, vocab_size=32000)
    with pytest.raises(provenance.TokenizerMismatch) as err:
        train_loader(config(byte_shard, tmp_path / "c"))
    message = str(err.value)
    assert byte_shard in message and "other.model" in message and "ByteTokenizer" in message
    assert "data.ignore_tokenizer_mismatch" in message


def test_override_key_trains_on_a_mismatching_shard_with_a_note(byte_shard, tmp_path):
    edit_sidecar(byte_shard, vocab_size=300)
    train = train_loader(config(byte_shard, tmp_path / "c", ignore_tokenizer_mismatch=True))
    assert next(train)["input_ids"].shape == (4, 64)
    assert "ignore_tokenizer_mismatch is set" in train.summary(10)


def test_sidecar_of_another_run_is_refused(byte_shard, tmp_path):
    path = provenance.sidecar_path(byte_shard)
    record = json.loads(open(path).read())
    record["documents"] += 1
    open(path, "w").write(json.dumps(record))
    with pytest.raises(ValueError, match="another run"):
        train_loader(config(byte_shard, tmp_path / "c"))


def test_shard_without_sidecar_trains_with_a_note(tmp_path):
    prefix = write_shard(str(tmp_path / "plain"), [[10, 11, 12]] * 20)
    train = train_loader(config(prefix, tmp_path / "c"))
    next(train)
    assert "no provenance sidecar" in train.summary(10)


def test_token_ids_outside_the_vocabulary_are_refused_naming_shard_and_document(tmp_path):
    docs = [[10, 11, 12]] * 7 + [[10, 400, 12]] + [[13, 14]] * 4  # 400 >= 261 ids of the byte tokenizer
    prefix = write_shard(str(tmp_path / "wide"), docs)
    train = train_loader(config(prefix, tmp_path / "c", packing="none", seq_length=16))
    with pytest.raises(DataError) as err:
        for _ in range(3):  # 12 rows: every document is drawn by the third batch
            next(train)
    assert "wide.bin: document 7 holds token id 400" in str(err.value) and "261" in str(err.value)


def test_zero_token_documents_are_counted_and_dropped_or_kept_by_the_flag(tmp_path):
    docs = [[10, 11, 12], [], [13, 14], [], []]
    prefix = write_shard(str(tmp_path / "gaps"), docs)
    dropped = train_loader(config(prefix, tmp_path / "c", packing="none", seq_length=8))
    kept = train_loader(config(prefix, tmp_path / "c", packing="none", seq_length=8, keep_empty_documents=True))
    assert dropped.mlm.sources[0].index(8).summary["empty_documents"] == 3
    assert dropped.mlm.sources[0].index(8).num_rows == 2 and kept.mlm.sources[0].index(8).num_rows == 5
    batch = next(kept)  # a kept empty document is a row holding [CLS][SEP]
    assert ((batch["segment_ids"] > 0).sum(dim=1) == 2).any()
    assert " 3 " in dropped.summary(10).splitlines()[2]  # the empty column


def test_preprocess_counts_zero_token_documents(tmp_path, monkeypatch):
    from megatron_jp.data import tokenizers

    class Silent(ByteTokenizer):  # drops ASCII "x": a document of only x encodes to nothing
        def encode(self, text):
            return super().encode(text.replace("x", ""))

    monkeypatch.setattr(tokenizers, "ByteTokenizer", Silent)
    src = write_jsonl(tmp_path / "z.jsonl", [{"text": "abc"}, {"text": "xxx"}, {"text": "d"}])
    summary = run_preprocess(tmp_path, [src], tmp_path / "z")
    assert summary["zero_token_documents"] == 1
    assert provenance.read_sidecar(str(tmp_path / "z_text_document"))["zero_token_documents"] == 1


def test_merge_refuses_shards_of_different_tokenizers_unless_allowed(tmp_path, tool):
    for name in ("p0", "p1"):
        run_preprocess(tmp_path, [write_jsonl(tmp_path / f"{name}.jsonl", documents(5))], tmp_path / name)
    edit_sidecar(str(tmp_path / "p1_text_document"), sha256="cd" * 32)
    inputs = [str(tmp_path / "p0_text_document"), str(tmp_path / "p1_text_document")]
    merge = tool("merge_datasets")
    assert merge(["--input", *inputs, "--output-prefix", str(tmp_path / "m")]) == 2
    assert not os.path.exists(tmp_path / "m.idx")
    assert merge(["--input", *inputs, "--output-prefix", str(tmp_path / "m"), "--allow-tokenizer-mismatch"]) == 0
    assert provenance.read_sidecar(str(tmp_path / "m"))["documents"] == 10


def test_slices_are_contiguous_and_cover_every_file_once(tmp_path):
    files = []
    for i, size in enumerate([10, 500, 20, 20, 300, 5, 5, 900]):
        (tmp_path / f"f{i}").write_bytes(b"x" * size)
        files.append(str(tmp_path / f"f{i}"))
    parts = [preprocess.select_slice(files, f"{i}/4") for i in range(4)]
    assert sum(parts, []) == files
    with pytest.raises(ValueError, match="I/N"):
        preprocess.select_slice(files, "4")


def test_four_slices_merged_are_byte_identical_to_one_run(tmp_path, tool):
    rng = np.random.default_rng(0)
    inputs = []
    for i in range(7):
        docs = documents(int(rng.integers(3, 30)))
        bad = [b"{broken\n"] if i == 2 else []
        inputs.append(write_jsonl(tmp_path / f"in{i}.jsonl", docs[i % 3:] + docs[:i % 3], raw_lines=bad))
    extra = ["--word-boundaries", "unidic-lite", "--on-error", "skip"]
    run_preprocess(tmp_path, inputs, tmp_path / "whole", *extra)
    for i in range(4):
        run_preprocess(tmp_path, inputs, tmp_path / "parts" / f"part{i}", "--slice", f"{i}/4", *extra)
    parts = [str(tmp_path / "parts" / f"part{i}_text_document") for i in range(4)]
    assert tool("merge_datasets")(["--input", *parts, "--output-prefix", str(tmp_path / "merged")]) == 0
    whole = str(tmp_path / "whole_text_document")
    for suffix in (".bin", ".idx", "_words.bin", "_words.idx"):
        assert open(whole + suffix, "rb").read() == open(str(tmp_path / "merged") + suffix, "rb").read(), suffix
    assert provenance.read_sidecar(whole) == provenance.read_sidecar(str(tmp_path / "merged"))
    assert provenance.read_sidecar(whole)["skipped"] == {"invalid_json": 1}


def test_array_job_scripts_write_the_bytes_of_one_job(tmp_path):
    import subprocess
    import sys

    from test_data_helpers import ROOT

    for i in range(5):
        write_jsonl(tmp_path / f"in{i}.jsonl", documents(4 + 3 * i))
    os.symlink(os.path.join(ROOT, "tools"), tmp_path / "tools")  # run where the scripts may write logs/
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               TOKENIZER_TYPE="ByteTokenizer", WORD_BOUNDARIES="none", SLURM_CPUS_PER_TASK="1")
    pattern, out = str(tmp_path / "in*.jsonl"), str(tmp_path / "corpus")

    def sbatch(script, *args, **task):
        run_env = dict(env, **{f"SLURM_ARRAY_TASK_{k}": str(v) for k, v in task.items()})
        proc = subprocess.run(["bash", os.path.join(ROOT, "slurm", script), *args], cwd=tmp_path, env=run_env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr

    sbatch("preprocess.sbatch", pattern, str(tmp_path / "whole"), "")
    for task in range(3):
        sbatch("preprocess.sbatch", pattern, out, "", ID=task, COUNT=3, MIN=0, MAX=2)
    sbatch("merge_datasets.sbatch", out)
    for suffix in (".bin", ".idx", ".json"):
        assert (tmp_path / f"whole_text_document{suffix}").read_bytes() == \
            (tmp_path / f"corpus_text_document{suffix}").read_bytes()
