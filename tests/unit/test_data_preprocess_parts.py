"""preprocess_data at node scale: workers that read and write their own parts give the bytes of one
process; parquet, zstd, gzip and plain JSONL give the same shards; a killed run resumes with only its
missing parts; a dead worker stops the run; outputs never overwrite inputs or files not ours."""

import glob
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_jp.data import inputs, preprocess
from megatron_jp.data.indexed import IndexedDataset
from megatron_jp.data.tokenizers import ByteTokenizer
from test_data_helpers import ROOT, documents, run_tool, write_jsonl

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

BYTE = ["--tokenizer-type", "ByteTokenizer"]
SUFFIXES = ("_text_document.bin", "_text_document.idx", "_text_document.json")
WORD_SUFFIXES = ("_text_document_words.bin", "_text_document_words.idx")


def run(files, prefix, *extra) -> dict:
    args = preprocess.parse_args(["--input", *map(str, files), "--output-prefix", str(prefix), "--quiet", *BYTE,
                                  *map(str, extra)])
    return preprocess.run(args)


def output_bytes(prefix, suffixes=SUFFIXES) -> dict:
    return {s: open(f"{prefix}{s}", "rb").read() for s in suffixes}


def jsonl_bytes(records) -> bytes:
    return b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in records)


def write_parquet(path, records, rows_per_group=7):
    pq.write_table(pa.Table.from_pylist(records), str(path), row_group_size=rows_per_group, compression="zstd",
                   write_page_checksum=True)
    return str(path)


def write_zst(path, records):
    # the zstd command writes a content checksum by default; so does this
    open(path, "wb").write(zstandard.ZstdCompressor(write_checksum=True).compress(jsonl_bytes(records)))
    return str(path)


def write_gz(path, records):
    open(path, "wb").write(gzip.compress(jsonl_bytes(records)))
    return str(path)


def temporary_files(folder) -> list[str]:
    return glob.glob(os.path.join(str(folder), "**", "*.tmp*"), recursive=True)


# --------------------------------------------------------------------------- byte identity

@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Files of very different sizes (one cut into many byte ranges, one empty) and the output of one
    process over them in one part: the layout of the single-process tool before parts existed (its
    bytes, sidecar included, were checked equal to that tool's by hand)."""
    folder = tmp_path_factory.mktemp("uneven")
    docs = documents(420)
    files = [write_jsonl(folder / "a.jsonl", docs[:350]), write_jsonl(folder / "b.jsonl", docs[350:351]),
             write_jsonl(folder / "c.jsonl", []), write_jsonl(folder / "d.jsonl", docs[351:])]
    refs = {}
    for words in ("none", "unidic-lite"):
        summary = run(files, folder / f"ref_{words}", "--word-boundaries", words, "--part-size-mb", 1e6)
        assert summary["parts"] == 1
        refs[words] = folder / f"ref_{words}"
    return files, refs


@pytest.mark.parametrize("words", ["none", "unidic-lite"])
@pytest.mark.parametrize("workers", [1, 2, 7])
def test_parts_from_any_number_of_workers_give_the_bytes_of_one_process(tmp_path, uneven, workers, words):
    files, refs = uneven
    part_mb = 0.004  # ~4 KB parts: the big file is cut at many line starts, the small ones share parts
    summary = run(files, tmp_path / "o", "--word-boundaries", words, "--workers", workers, "--part-size-mb", part_mb)
    plan = inputs.plan_parts(files, int(part_mb * 1e6))
    assert summary["parts"] == len(plan) > 2 * workers
    assert sum(p.path.endswith("a.jsonl") for part in plan for p in part.pieces) > 10
    suffixes = SUFFIXES + (WORD_SUFFIXES if words != "none" else ())
    assert output_bytes(tmp_path / "o", suffixes) == output_bytes(refs[words], suffixes)
    assert not os.path.exists(tmp_path / "o.parts")  # removed once the output is complete


def test_byte_ranges_start_at_line_starts_and_cover_the_file(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", documents(200))
    data = open(src, "rb").read()
    pieces = inputs.file_pieces(src, 1000)
    assert pieces[0].start == 0 and pieces[-1].stop == len(data)
    assert all(a.stop == b.start for a, b in zip(pieces, pieces[1:]))
    assert all(data[p.start - 1:p.start] == b"\n" for p in pieces[1:])


# ----------------------------------------------------------------------------------- formats

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    docs = [{"text": d["text"], "id": d["id"], "meta": {"text": d["text"][::-1]}} for d in documents(120)]
    ref = folder / "ref"
    run([write_jsonl(folder / "all.jsonl", docs)], ref, "--word-boundaries", "unidic-lite")
    return folder, docs, ref


@pytest.mark.parametrize("layout", ["parquet", "zst", "gz", "mixed"])
def test_the_same_documents_in_any_format_give_the_same_shards(tmp_path, corpus, layout):
    _, docs, ref = corpus
    writers = {"parquet": lambda p, d: write_parquet(p.with_suffix(".parquet"), d),
               "zst": lambda p, d: write_zst(p.with_suffix(".jsonl.zst"), d),
               "gz": lambda p, d: write_gz(p.with_suffix(".jsonl.gz"), d)}
    if layout == "mixed":
        files = [writers["parquet"](tmp_path / "1", docs[:45]), writers["zst"](tmp_path / "2", docs[45:80]),
                 writers["gz"](tmp_path / "3", docs[80:100]), write_jsonl(tmp_path / "4.jsonl", docs[100:])]
    else:
        files = [writers[layout](tmp_path / "all", docs)]
    summary = run(files, tmp_path / "o", "--word-boundaries", "unidic-lite", "--workers", 2, "--part-size-mb", 0.002)
    assert summary["documents"] == 120
    assert summary["parts"] == 1 if layout in ("zst", "gz") else summary["parts"] > 2  # a stream is one part
    suffixes = SUFFIXES[:2] + WORD_SUFFIXES  # the sidecar's text_bytes count JSON lines or parquet texts
    assert output_bytes(tmp_path / "o", suffixes) == output_bytes(ref, suffixes)


def test_dotted_key_reads_a_nested_field_alike_in_parquet_and_jsonl(tmp_path, corpus):
    folder, docs, _ = corpus
    run([write_parquet(tmp_path / "a.parquet", docs)], tmp_path / "p", "--json-keys", "meta.text")
    run([folder / "all.jsonl"], tmp_path / "j", "--json-keys", "meta.text")
    ds = IndexedDataset(str(tmp_path / "p_meta.text_document"))
    assert ByteTokenizer().decode(ds[3]) == docs[3]["text"][::-1]
    suffixes = ("_meta.text_document.bin", "_meta.text_document.idx")
    assert output_bytes(tmp_path / "p", suffixes) == output_bytes(tmp_path / "j", suffixes)


def test_parquet_null_and_missing_column_are_named_by_row_group_and_row(tmp_path):
    src = write_parquet(tmp_path / "a.parquet", [{"text": "良い"}] * 9 + [{"text": None}], rows_per_group=4)
    proc = run_tool("preprocess_data.py", "--input", src, "--output-prefix", tmp_path / "o", *BYTE)
    assert proc.returncode == 2 and f"{src}: row group 2, row 1: value of key 'text' is null" in proc.stderr
    proc = run_tool("preprocess_data.py", "--input", src, "--output-prefix", tmp_path / "o", *BYTE,
                    "--json-keys", "body")
    assert proc.returncode == 2 and "missing key 'body' (columns present: text)" in proc.stderr
    assert not glob.glob(str(tmp_path / "o*"))


def test_corrupt_parquet_footer_is_named(tmp_path):
    src = write_parquet(tmp_path / "a.parquet", documents(30))
    data = open(src, "rb").read()
    open(src, "wb").write(data[:-20])
    proc = run_tool("preprocess_data.py", "--input", src, "--output-prefix", tmp_path / "o", *BYTE)
    assert proc.returncode == 2 and f"{src}: not a readable parquet file" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not glob.glob(str(tmp_path / "o*"))


def _damage_row_group(path, group: int):
    col = pq.ParquetFile(path).metadata.row_group(group).column(0)
    data = bytearray(open(path, "rb").read())
    first = col.dictionary_page_offset or col.data_page_offset  # the chunk starts with its dictionary
    middle = first + col.total_compressed_size // 2
    data[middle:middle + 8] = bytes(b ^ 0x5A for b in data[middle:middle + 8])
    open(path, "wb").write(bytes(data))


def test_corrupt_parquet_row_group_is_named_and_nothing_half_written_remains(tmp_path):
    src = write_parquet(tmp_path / "a.parquet", documents(90), rows_per_group=30)
    _damage_row_group(src, 1)
    proc = run_tool("preprocess_data.py", "--input", src, "--output-prefix", tmp_path / "o", *BYTE, "--workers", 2,
                    "--part-size-mb", 0.0001)
    assert proc.returncode == 2 and f"{src}: row group 1, row 0: corrupt row group" in proc.stderr, proc.stderr
    assert not glob.glob(str(tmp_path / "o*"))
    summary = run([src], tmp_path / "s", "--on-error", "skip")
    assert summary["skipped"] == {"bad_parquet": 1} and summary["documents"] == 60


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_damaged_zstd_stream_is_named_by_file_and_line(tmp_path, damage):
    src = write_zst(tmp_path / "a.jsonl.zst", documents(400))
    data = bytearray(open(src, "rb").read())
    if damage == "truncated":
        data = data[:len(data) // 2]
    else:  # a damaged block: the frame's checksum (or the format) catches it
        data[len(data) // 2] ^= 0xFF
    open(src, "wb").write(bytes(data))
    proc = run_tool("preprocess_data.py", "--input", src, "--output-prefix", tmp_path / "o", *BYTE)
    assert proc.returncode == 2 and f"{src}:" in proc.stderr and "truncated or corrupt zstd" in proc.stderr
    assert not glob.glob(str(tmp_path / "o*"))
    summary = run([src], tmp_path / "s", "--on-error", "skip")
    assert summary["skipped"] == {"bad_zstd": 1} and summary["documents"] < 400


def test_zstd_file_of_several_frames_is_read_to_its_end(tmp_path, corpus):
    _, docs, ref = corpus
    frames = b"".join(zstandard.ZstdCompressor().compress(jsonl_bytes(docs[i:i + 30])) for i in range(0, 120, 30))
    open(tmp_path / "a.jsonl.zst", "wb").write(frames)
    run([tmp_path / "a.jsonl.zst"], tmp_path / "o", "--word-boundaries", "unidic-lite")
    assert output_bytes(tmp_path / "o") == output_bytes(ref)


# ----------------------------------------------------------------------------------- restart

def big_corpus(folder, n=6000):
    return write_jsonl(folder / "in.jsonl", documents(n))


def start(src, prefix, *extra) -> subprocess.Popen:
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", str(src), "--quiet",
           "--output-prefix", str(prefix), *BYTE, "--word-boundaries", "unidic-lite", *map(str, extra)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def records(prefix) -> list[str]:
    return sorted(glob.glob(f"{prefix}.parts/[0-9]*[0-9].json"))


def kill_midway(src, prefix, parts_wanted=3) -> int:
    """Start a run of 2 workers and kill it and its workers (a node failure) once `parts_wanted` parts are
    complete; return how many were."""
    proc = start(src, prefix, "--workers", 2, "--part-size-mb", 0.02)
    deadline = time.time() + 60
    while len(records(prefix)) < parts_wanted and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return len(records(prefix))


def test_rerun_after_a_kill_redoes_only_the_missing_parts(tmp_path):
    src = big_corpus(tmp_path)
    n_parts = len(inputs.plan_parts([src], int(0.02 * 1e6)))
    done = kill_midway(src, tmp_path / "o")
    assert 3 <= done < n_parts - 1 and not os.path.exists(tmp_path / "o_text_document.idx")
    damaged = records(tmp_path / "o")[0].replace(".json", "_text_document_words.bin")
    with open(damaged, "ab") as f:  # a complete part whose file changed since is not trusted
        f.write(b"\0")
    summary = run([src], tmp_path / "o", "--word-boundaries", "unidic-lite", "--workers", 2, "--part-size-mb", 0.02)
    assert summary["parts"] == n_parts and summary["parts_reused"] == done - 1  # the rest was redone
    run([src], tmp_path / "ref", "--word-boundaries", "unidic-lite")
    suffixes = SUFFIXES + WORD_SUFFIXES
    assert output_bytes(tmp_path / "o", suffixes) == output_bytes(tmp_path / "ref", suffixes)
    assert temporary_files(tmp_path) == [] and not os.path.exists(tmp_path / "o.parts")


def test_parts_from_other_arguments_are_never_reused(tmp_path):
    src = big_corpus(tmp_path, 3000)
    assert kill_midway(src, tmp_path / "o") >= 3
    summary = run([src], tmp_path / "o", "--word-boundaries", "unidic-lite", "--part-size-mb", 0.02, "--append-eod")
    assert summary["parts_reused"] == 0
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert all(ds[i][-1] == ByteTokenizer().eod_id for i in range(len(ds)))


# ------------------------------------------------------------------- issue 19: items 2, 4, 16

def worker_pids(pid: int) -> list[int]:
    """The spawned worker processes of `pid` (not multiprocessing's resource tracker)."""
    found = []
    for child in open(f"/proc/{pid}/task/{pid}/children").read().split():
        cmdline = open(f"/proc/{child}/cmdline", "rb").read()
        if b"spawn_main" in cmdline:
            found.append(int(child))
    return found


def test_dead_worker_stops_the_run_naming_the_cause_and_the_input(tmp_path):
    src = big_corpus(tmp_path, 12000)
    proc = start(src, tmp_path / "o", "--workers", 2, "--part-size-mb", 0.05)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not (
            worker_pids(proc.pid) and glob.glob(str(tmp_path / "o.parts" / "*.tmp*"))):
        time.sleep(0.01)
    os.kill(worker_pids(proc.pid)[0], signal.SIGKILL)  # what the out-of-memory killer does
    killed = time.time()
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("preprocess_data kept waiting for a dead worker")
    assert time.time() - killed < 15
    assert proc.returncode == 1 and "SIGKILL" in err and src in err and "Traceback" not in err, err
    assert temporary_files(tmp_path) == [] and not os.path.exists(tmp_path / "o_text_document.idx")


def test_an_input_at_an_output_path_is_refused_and_kept(tmp_path):
    src = write_jsonl(tmp_path / "o_text_document.json", documents(5))  # where the sidecar would go
    before = open(src, "rb").read()
    proc = run_tool("preprocess_data.py", "--input", src, "--output-prefix", tmp_path / "o", *BYTE)
    assert proc.returncode == 2 and "is also an output of this run" in proc.stderr
    assert open(src, "rb").read() == before and sorted(os.listdir(tmp_path)) == ["o_text_document.json"]


@pytest.mark.parametrize("name", ["o_text_document.json", "o_text_document.idx"])
def test_a_file_not_written_by_preprocess_at_an_output_path_is_refused_and_kept(tmp_path, name):
    src = write_jsonl(tmp_path / "in.jsonl", documents(5))
    open(tmp_path / name, "w").write('{"my": "notes"}\n')
    proc = run_tool("preprocess_data.py", "--input", src, "--output-prefix", tmp_path / "o", *BYTE)
    assert proc.returncode == 2 and f"{tmp_path / name} exists and is not" in proc.stderr
    assert open(tmp_path / name).read() == '{"my": "notes"}\n'


def test_rerun_over_the_same_prefix_replaces_its_own_outputs(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", documents(5))
    for _ in range(2):
        run_tool("preprocess_data.py", "--input", src, "--output-prefix", tmp_path / "o", *BYTE, check=True)


def _read_only(folder):
    """Make `folder` unwritable, for root too (root ignores the mode bits: chattr +i binds it)."""
    os.chmod(folder, 0o555)
    if os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root without chattr: cannot make a folder read-only")


def test_read_only_output_folder_is_one_error_line_and_status_2(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", documents(5))
    out = tmp_path / "ro"
    out.mkdir()
    _read_only(out)
    try:
        proc = run_tool("preprocess_data.py", "--input", src, "--output-prefix", out / "o", *BYTE)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(out)], capture_output=True)
        os.chmod(out, 0o755)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and str(out) in proc.stderr
    assert os.listdir(out) == []
