"""tools/preprocess_data.py: outputs, worker determinism, and the bad-input matrix."""

import glob
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_jp.data import indexed
from megatron_jp.data.indexed import IndexedDataset
from megatron_jp.data.tokenizers import ByteTokenizer
from test_data_helpers import ROOT, documents, run_tool, sample_lines, train_spm, write_jsonl

BYTE = ["--tokenizer-type", "ByteTokenizer"]


def preprocess(*args, check=True):
    proc = run_tool("preprocess_data.py", "--quiet", *args)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def summary_of(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def shard_files(folder) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(str(folder), "*")) if p.endswith((".bin", ".idx")))


def test_byte_shard_holds_the_utf8_of_each_document(tmp_path):
    docs = documents(12)
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    proc = preprocess("--input", src, "--output-prefix", tmp_path / "out", *BYTE)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    tok = ByteTokenizer()
    assert [tok.decode(ds[i]) for i in range(len(ds))] == [d["text"] for d in docs]
    s = summary_of(proc)
    assert s["documents"] == 12 and s["tokens"] == int(ds.doc_lengths.sum()) and s["skipped_total"] == 0
    assert "documents 12" in proc.stderr  # the human-readable summary


def test_gz_glob_several_keys_and_append_eod(tmp_path):
    recs = [{"text": f"本文{i}", "title": f"題{i}"} for i in range(6)]
    write_jsonl(tmp_path / "a.jsonl", recs[:3])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs[3:])
    preprocess("--input", str(tmp_path / "*.jsonl*"), "--json-keys", "text", "title", "--append-eod",
               "--output-prefix", tmp_path / "o", *BYTE)
    tok = ByteTokenizer()
    for key in ("text", "title"):
        ds = IndexedDataset(str(tmp_path / f"o_{key}_document"))
        assert [tok.decode(ds[i][:-1]) for i in range(6)] == [r[key] for r in recs]
        assert all(ds[i][-1] == tok.eod_id for i in range(6))


def test_two_workers_write_the_same_bytes_as_one(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", documents(300))
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        preprocess("--input", src, "--output-prefix", out, "--workers", workers, *BYTE, "--word-boundaries",
                   "unidic-lite")
        outs.append(out)
    for suffix in ("_text_document", "_text_document_words"):
        for ext in (".bin", ".idx"):
            a, b = (open(f"{o}{suffix}{ext}", "rb").read() for o in outs)
            assert a == b


def test_word_flags_shard_matches_token_lengths_with_sentencepiece(tmp_path):
    model = train_spm(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", documents(20))
    preprocess("--input", src, "--output-prefix", tmp_path / "o", "--tokenizer-type", "SentencePieceTokenizer",
               "--tokenizer-model", model, "--word-boundaries", "unidic-lite")
    tokens = IndexedDataset(str(tmp_path / "o_text_document"))
    words = indexed.open_words(str(tmp_path / "o_text_document"), tokens)
    assert tokens.dtype == np.uint16
    assert all(words[i][0] == 1 for i in range(len(words)))
    assert 0.3 < words.tokens.mean() < 1.0  # some tokens continue a word, many start one


# ------------------------------------------------------------------------------ bad-input matrix

GOOD = json.dumps({"text": "良い行です"}, ensure_ascii=False).encode() + b"\n"
BAD_LINES = {
    "invalid_json": (b'{"text": "abc"\n', "invalid JSON"),
    "missing_key": (b'{"body": "abc"}\n', "missing key 'text'"),
    "not_string": (b'{"text": 42}\n', "is int, expected a string"),
    "invalid_utf8": (b'{"text": "\xff\xfe"}\n', "invalid UTF-8"),
    "empty_text": (b'{"text": "  "}\n', "empty text"),
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_line_fails_with_file_line_and_reason(tmp_path, reason):
    raw, message = BAD_LINES[reason]
    src = write_jsonl(tmp_path / "in.jsonl", [], [GOOD, GOOD, raw, GOOD])
    proc = preprocess("--input", src, "--output-prefix", tmp_path / "o", *BYTE, check=False)
    assert proc.returncode == 2  # bad input: one `error:` line, status 2 (issue 19 item 16)
    assert f"{src}:3:" in proc.stderr and message in proc.stderr
    assert shard_files(tmp_path) == []  # nothing that looks like a shard, not even a temporary one
    assert not glob.glob(str(tmp_path / "o*"))


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_line_is_counted_and_skipped(tmp_path, reason):
    raw, _ = BAD_LINES[reason]
    src = write_jsonl(tmp_path / "in.jsonl", [], [GOOD, raw, GOOD, raw])
    s = summary_of(preprocess("--input", src, "--output-prefix", tmp_path / "o", *BYTE, "--on-error", "skip"))
    assert s["skipped"] == {reason: 2} and s["documents"] == 2
    assert len(IndexedDataset(str(tmp_path / "o_text_document"))) == 2


def _truncated_gz(path, n_lines=2000):
    data = gzip.compress(b"".join(GOOD for _ in range(n_lines)))
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return str(path)


def test_truncated_gz_fails_naming_the_file(tmp_path):
    src = _truncated_gz(tmp_path / "cut.jsonl.gz")
    proc = preprocess("--input", src, "--output-prefix", tmp_path / "o", *BYTE, check=False)
    assert proc.returncode == 2 and src in proc.stderr and "truncated or corrupt gzip" in proc.stderr
    assert shard_files(tmp_path) == []


def test_truncated_gz_is_counted_and_the_next_file_still_read(tmp_path):
    src = _truncated_gz(tmp_path / "a_cut.jsonl.gz")
    good = write_jsonl(tmp_path / "b.jsonl", [{"text": "続き"}])
    s = summary_of(preprocess("--input", src, good, "--output-prefix", tmp_path / "o", *BYTE, "--on-error", "skip"))
    assert s["skipped"] == {"bad_gzip": 1} and 0 < s["documents"] < 2001


def _huge_document(path, megabytes=50):
    unit = "".join(sample_lines()) + "\n"
    text = unit * (megabytes * (1 << 20) // len(unit.encode("utf-8")) + 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": "小さい文書"}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return str(path), len(text.encode("utf-8"))


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    return _huge_document(tmp_path_factory.mktemp("huge") / "huge.jsonl")


def test_50mb_document_is_refused_above_the_limit_with_the_reason(tmp_path, huge):
    src, _ = huge
    proc = preprocess("--input", src, "--output-prefix", tmp_path / "o", *BYTE, check=False)
    assert proc.returncode == 2 and f"{src}:2:" in proc.stderr and "exceeds --max-document-bytes" in proc.stderr
    s = summary_of(preprocess("--input", src, "--output-prefix", tmp_path / "o", *BYTE, "--on-error", "skip"))
    assert s["skipped"] == {"too_large": 1} and s["documents"] == 1


@pytest.mark.slow
def test_50mb_document_is_processed_in_bounded_memory_when_allowed(tmp_path, huge):
    src, n_bytes = huge
    # VmHWM is this process's own peak (ru_maxrss would include the forking pytest's, kept across exec).
    code = ("import sys; from megatron_jp.data.preprocess import main; rc = main(sys.argv[1:]); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print('MAXRSS', hwm); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "--input", src, "--output-prefix", str(tmp_path / "o"),
                           *BYTE, "--max-document-bytes", "0", "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    peak_mb = int(proc.stdout.split("MAXRSS")[1]) / 1024
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert ds.doc_lengths[1] == n_bytes  # one byte token per byte of the text
    # ~ raw line + decoded text + uint16 ids: a few times the document, never the corpus.
    assert peak_mb < 8 * n_bytes / 2**20, f"peak RSS {peak_mb:.0f} MB"
    print(f"peak RSS {peak_mb:.0f} MB for a {n_bytes / 2**20:.0f} MB document")


def start_and_signal_mid_write(tmp_path, sig) -> subprocess.Popen:
    """Start preprocess_data on 3,000 documents and send `sig` once it writes its temporary shard."""
    src = write_jsonl(tmp_path / "in.jsonl", documents(3000))
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", src, "--quiet",
           "--output-prefix", str(tmp_path / "o"), *BYTE, "--word-boundaries", "unidic-lite"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while not glob.glob(str(tmp_path / "o_text_document.bin.tmp*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc


def test_killed_run_leaves_no_complete_shard(tmp_path):
    start_and_signal_mid_write(tmp_path, signal.SIGKILL).wait()
    assert shard_files(tmp_path) == []


def test_next_run_over_the_prefix_removes_what_a_killed_run_left(tmp_path):
    start_and_signal_mid_write(tmp_path, signal.SIGKILL).wait()
    left = glob.glob(str(tmp_path / "o*.tmp*")) + glob.glob(str(tmp_path / "o.parts" / "*.tmp*"))
    assert left  # what SIGKILL leaves: nothing can clean up in the killed process
    preprocess("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "o", *BYTE)
    assert not glob.glob(str(tmp_path / "**" / "*.tmp*"), recursive=True)
    assert len(IndexedDataset(str(tmp_path / "o_text_document"))) == 3000


def test_terminated_run_removes_its_temporary_files(tmp_path):
    assert start_and_signal_mid_write(tmp_path, signal.SIGTERM).wait() != 0
    assert not glob.glob(str(tmp_path / "o_*"))
    assert not glob.glob(str(tmp_path / "o.parts" / "*.tmp*"))  # complete parts stay for a rerun, nothing else


def test_missing_input_is_an_error(tmp_path):
    proc = preprocess("--input", str(tmp_path / "nope*.jsonl"), "--output-prefix", tmp_path / "o", *BYTE, check=False)
    assert proc.returncode == 2 and "glob matched nothing" in proc.stderr


def test_blank_lines_are_ignored_not_errors(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [], [GOOD, b"\n", GOOD, b"   \n"])
    s = summary_of(preprocess("--input", src, "--output-prefix", tmp_path / "o", *BYTE))
    assert s["documents"] == 2 and s["blank_lines"] == 2 and s["skipped_total"] == 0
