"""Nothing lost, nothing trusted (issue 13): checkpoints that cannot be overwritten, pruned or
corrupted silently, folders one run owns, no code from downloaded folders. One test per defect of
the issue, each named as the claim it checks. Modules that issue 13 added (megatron_jp.files,
training.runtime.run_lock) are imported inside the tests that use them, so that on the code before it every
test runs and fails for its own reason."""

import errno
import json
import os
import pickle
import socket
import subprocess
import sys
import time

import pytest
import torch

from megatron_jp.config import Config
from megatron_jp.training.checkpoint import dcp_pieces
from megatron_jp.training.checkpoint import (CheckpointError, Checkpointer, find_latest, load_model_state,
                                             save_model_checkpoint)
from megatron_jp.training.startup import starting_checkpoint
from test_checkpoint import ONE, build, load_into_fresh, saved, tiny_config  # noqa: F401  (saved: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def weights(cfg, seed=3):
    from megatron_jp.models.encoder import build_encoder

    return build_encoder(cfg.model, seed=seed).state_dict()


# ----------------------------------------------------------------------------- 1. a missing `latest`


def test_iterations_without_latest_are_refused_with_a_listing_instead_of_a_fresh_start(saved):
    cfg, folder = saved
    (folder.parent / "latest").unlink()
    run = Config(checkpoint=cfg.checkpoint.__class__(dir=str(folder.parent)))
    with pytest.raises(CheckpointError, match=r"holds checkpoints but no `latest`.*iter_0000002 \(complete\).*"
                                              r"echo iter_0000002 >"):
        starting_checkpoint(run)


@pytest.mark.parametrize("latest", ["directory", "binary"])
def test_a_latest_that_is_a_directory_or_binary_is_refused_naming_it(tmp_path, latest):
    path = tmp_path / "latest"
    path.mkdir() if latest == "directory" else path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match=rf"{path} (is not a file|holds)"):
        find_latest(tmp_path)


def test_pruning_never_deletes_a_checkpoint_this_run_did_not_write(tmp_path):
    cfg = tiny_config()
    model, optimizer = build(cfg)
    save_model_checkpoint(tmp_path / "import", 1, cfg, weights(cfg))  # e.g. an imported model...
    (tmp_path / "ckpt").mkdir()
    os.replace(tmp_path / "import" / "iter_0000001", tmp_path / "ckpt" / "iter_0000001")  # ...copied in
    (tmp_path / "ckpt" / "latest").write_text("iter_0000001\n")
    saver = Checkpointer(tmp_path / "ckpt", cfg, ONE, keep=1)
    for step in (2, 3, 4):
        saver.save(step, model, optimizer, meta={"step": step})
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("iter_*")) == ["iter_0000001", "iter_0000004"]


def test_a_resumed_run_prunes_the_checkpoints_of_its_earlier_processes(tmp_path):
    cfg = tiny_config()
    model, optimizer = build(cfg)
    first = Checkpointer(tmp_path, cfg, ONE, keep=2)
    first.save(1, model, optimizer)
    first.save(2, model, optimizer)
    resumed = Checkpointer(tmp_path, cfg, ONE, keep=2)
    resumed.adopt(resumed.load(find_latest(tmp_path), model, optimizer))
    resumed.save(3, model, optimizer)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000002", "iter_0000003"]


# ----------------------------------------------------------------------------- 2. tools writing into a run


def test_average_checkpoints_refuses_a_runs_checkpoint_dir_and_adds_a_new_iteration_only_when_asked(
        saved, tool, capsys):
    cfg, trained = saved
    run_dir = trained.parent
    before = (trained / "meta.json").read_bytes()
    args = ["--checkpoints", str(trained), str(trained), "--output", str(run_dir)]
    assert tool("average_checkpoints")(args) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert (trained / "meta.json").read_bytes() == before  # the full checkpoint is still there
    assert tool("average_checkpoints")(args + ["--iteration", "2"]) == 2  # never replaces a folder
    assert tool("average_checkpoints")(args + ["--iteration", "7"]) == 0
    assert (run_dir / "latest").read_text().strip() == "iter_0000002"  # `latest` left alone
    assert load_model_state(run_dir / "iter_0000007")[0].model == cfg.model


def test_convert_from_hf_refuses_to_repoint_latest_of_a_runs_checkpoint_dir(saved, tool, tmp_path, capsys):
    _, trained = saved
    assert tool("convert_to_hf")(["--checkpoint", str(trained), "--output", str(tmp_path / "hf")]) == 0
    assert tool("convert_from_hf")(["--hf", str(tmp_path / "hf"), "--output", str(trained.parent)]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert find_latest(trained.parent) == trained


# ----------------------------------------------------------------------------- 3. silent corruption


def test_a_same_size_bit_flip_in_a_shard_is_refused_naming_the_file(saved):
    cfg, folder = saved
    shard = folder / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard} does not have the content meta.json records"):
        load_into_fresh(cfg, folder)
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load_model_state(folder)


def test_a_save_of_non_finite_weights_is_refused_and_the_last_good_checkpoint_stays_and_is_kept(tmp_path):
    cfg = tiny_config()
    model, optimizer = build(cfg)
    saver = Checkpointer(tmp_path, cfg, ONE, keep=1)
    saver.save(1, model, optimizer, meta={"step": 1})
    with torch.no_grad():
        model.infos[0].param.data[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"step 2: non-finite values .* not saved, iter_0000001 stays"):
        saver.save(2, model, optimizer)
    assert find_latest(tmp_path).name == "iter_0000001" and not list(tmp_path.glob("*iter_0000002*"))


def test_a_checkpoint_holding_non_finite_weights_is_refused_on_load(tmp_path):
    from megatron_jp.training.checkpoint.checkpointer import _save_model_checkpoint

    cfg = tiny_config()
    state = weights(cfg)
    state["embeddings.tok.weight"][3, 3] = float("inf")
    _save_model_checkpoint(tmp_path, 1, cfg, state, None, False)  # the writer without its own check
    with pytest.raises(CheckpointError, match=r"holds non-finite weights \(embeddings.tok.weight"):
        load_model_state(tmp_path)
    with pytest.raises(CheckpointError, match=r"iter_0000001 holds: non-finite values"):
        load_into_fresh(cfg, tmp_path / "iter_0000001", with_optimizer=False)


def _rewrite_manifest(folder, report):
    from megatron_jp.training.checkpoint import manifest

    info = json.loads((folder / "meta.json").read_text())
    info["files"] = manifest.build(folder, report.files)
    (folder / "meta.json").write_text(json.dumps(info))


# ----------------------------------------------------------------------------- 4. no code from folders


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_metadata_pickle_is_refused_without_running_its_code(saved, tmp_path):
    cfg, folder = saved
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _rewrite_manifest(folder, dcp_pieces.WriteReport())  # even with a matching checksum
    with pytest.raises(CheckpointError, match=r"\.metadata refused: it refers to (posix|os)\.system"):
        load_model_state(folder)
    with pytest.raises(CheckpointError, match="refused"):
        load_into_fresh(cfg, folder)
    assert not marker.exists()


def test_metadata_whose_checksum_differs_from_the_manifest_is_refused_before_unpickling(saved):
    cfg, folder = saved
    with open(folder / ".metadata", "ab") as f:
        f.write(b"\x00")
    info = json.loads((folder / "meta.json").read_text())
    info["files"][".metadata"]["bytes"] += 1  # a size that matches: only the hash can tell
    (folder / "meta.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"\.metadata does not have the content"):
        load_into_fresh(cfg, folder)


def test_pseudo_perplexity_refuses_a_folder_with_remote_code_unless_trust_remote_code_is_passed(
        tmp_path, tool, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "x", "auto_map": {"AutoModelForMaskedLM": "m.M"}}))
    (folder / "m.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w')\n")
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "abc"}\n')
    assert tool("pseudo_perplexity")(["--hf", str(folder), "--input", str(docs)]) == 2
    assert "pass --trust-remote-code" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------- 5. one run per folder


def test_a_second_owner_of_a_folder_is_refused_naming_host_and_pid(tmp_path):
    from megatron_jp.training.runtime.run_lock import DirLock, LockedError

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from megatron_jp.training.runtime.run_lock import "
                               "DirLock; DirLock(sys.argv[1], 'a training run').acquire(); print('held', flush=True); "
                               "time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"in use by a training run on host {socket.gethostname()}, "
                                              rf"pid {holder.pid}"):
            DirLock(tmp_path, "another run").acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = DirLock(tmp_path, "another run").acquire()  # the holder died: its lock is stale
    assert "took over the stale lock" in lock.note and f"pid {holder.pid}" in lock.note
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_a_lock_whose_heartbeat_stopped_is_stale_even_on_another_host(tmp_path):
    from megatron_jp.training.runtime.run_lock import DirLock, LockedError

    (tmp_path / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "what": "a run"}))
    with pytest.raises(LockedError, match="host elsewhere, pid 1"):
        DirLock(tmp_path, "me").acquire()
    old = time.time() - 3600
    os.utime(tmp_path / ".lock", (old, old))
    lock = DirLock(tmp_path, "me", stale_s=60).acquire()
    assert lock.owned()
    lock.release()


def test_a_tool_cannot_write_into_a_checkpoint_dir_a_run_holds(tmp_path):
    from megatron_jp.training.runtime.run_lock import DirLock

    cfg = tiny_config()
    with DirLock(tmp_path, "a training run"):
        with pytest.raises(CheckpointError, match="in use by a training run"):
            save_model_checkpoint(tmp_path, 0, cfg, weights(cfg))


# ----------------------------------------------------------------------------- 6. silent wrong results


def test_convert_from_hf_refuses_weights_whose_shapes_disagree_with_config_json(saved, tool, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    _, trained = saved
    hf = tmp_path / "hf"
    assert tool("convert_to_hf")(["--checkpoint", str(trained), "--output", str(hf)]) == 0
    tensors = load_file(str(hf / "model.safetensors"))
    name = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(hf / "model.safetensors"))
    assert tool("convert_from_hf")(["--hf", str(hf), "--output", str(tmp_path / "imported")]) == 2
    assert f"{name} has shape" in capsys.readouterr().err and not (tmp_path / "imported").exists()


def test_convert_from_hf_refuses_layers_beyond_num_hidden_layers(saved, tool, tmp_path, capsys):
    _, trained = saved
    hf = tmp_path / "hf"
    assert tool("convert_to_hf")(["--checkpoint", str(trained), "--output", str(hf)]) == 0
    config = json.loads((hf / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (hf / "config.json").write_text(json.dumps(config))
    assert tool("convert_from_hf")(["--hf", str(hf), "--output", str(tmp_path / "imported")]) == 2
    assert "says 1 layers, but the weights hold more" in capsys.readouterr().err


def test_a_non_finite_average_exits_non_zero_and_writes_nothing(tmp_path, tool, capsys):
    cfg = tiny_config()
    save_model_checkpoint(tmp_path / "big", 1, cfg, {k: torch.full_like(v, 3e38) for k, v in weights(cfg).items()})
    out = tmp_path / "avg"
    args = ["--checkpoints", str(tmp_path / "big"), str(tmp_path / "big"), "--weights", "2", "-1", "--output", str(out)]
    assert tool("average_checkpoints")(args) == 1  # 2 x 3e38 overflows to inf
    assert "the average is not finite" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("overrides, message", [
    ({"optim.schedule": "wsd", "optim.warmup_steps": 60, "optim.decay_steps": 50}, "optim.decay_steps"),
    ({"train.rampup_batch_size": "16 4 10"}, "train.rampup_batch_size"),
])
def test_config_relations_between_keys_are_refused_naming_them(overrides, message):
    from megatron_jp.config import ConfigError, load_config, validate

    args = [item for k, v in {"train.steps": 100, "train.global_batch_size": 8, "train.micro_batch_size": 4,
                              **overrides}.items() for item in (f"--{k}", str(v))]
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, args), world_size=1)


# ----------------------------------------------------------------------------- 7. failing early


def test_a_checkpoint_dir_without_room_for_one_checkpoint_is_refused_before_the_first_step(tmp_path):
    saver = Checkpointer(tmp_path / "ckpt", tiny_config(), ONE)
    with pytest.raises(CheckpointError, match=r"GB free, one checkpoint of this run takes about"):
        saver.preflight(1 << 62)
    saver.preflight(1 << 10)


def test_a_read_only_checkpoint_dir_is_refused_before_the_first_step_naming_erofs(tmp_path, monkeypatch):
    from megatron_jp.training.checkpoint import checkpointer as checkpoint

    def read_only(path, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(checkpoint, "write_durably", read_only)
    with pytest.raises(CheckpointError, match=r"the file system is read-only \(EROFS\)"):
        Checkpointer(tmp_path, tiny_config(), ONE).preflight(1)


def test_a_full_disk_during_a_save_is_named_enospc_and_its_temporary_folder_is_removed(tmp_path, monkeypatch):
    cfg = tiny_config()
    model, optimizer = build(cfg)

    def full(self, plan, planner):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(dcp_pieces.StreamingWriter, "write_data", full)
    with pytest.raises(CheckpointError, match=r"no space left on the device \(ENOSPC\)"):
        Checkpointer(tmp_path, cfg, ONE).save(1, model, optimizer)
    assert not list(tmp_path.glob(".iter_*"))


# ----------------------------------------------------------------------------- 8. garbage on a full disk


def test_aborted_shards_are_removed_even_when_closing_them_fails_on_a_full_disk(tmp_path):
    import numpy as np

    from megatron_jp.data.indexed import IndexedDatasetWriter

    writer = IndexedDatasetWriter(str(tmp_path / "s"), np.uint16)
    writer.add_document(np.arange(10))

    class FullDisk:
        def __init__(self, f):
            self.f, self.name = f, f.name

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def fileno(self):
            return self.f.fileno()

    writer._bin = FullDisk(writer._bin)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_convert_to_hf_failing_on_the_tokenizer_leaves_no_folder_behind(saved, tool, tmp_path, monkeypatch):
    from megatron_jp.data import tokenizers

    _, trained = saved

    def full_disk(tokenizer, folder):
        (tmp_path / "half").write_text("x")
        open(os.path.join(folder, "tokenizer.json"), "w").write('{"trunc')
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(folder, "tokenizer.json"))

    monkeypatch.setattr(tokenizers, "save_hf_tokenizer", full_disk)
    out = tmp_path / "hf"
    assert tool("convert_to_hf")(["--checkpoint", str(trained), "--output", str(out), "--tokenizer-type",
                                  "ByteTokenizer"]) == 2
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "half"]


def test_outputs_are_written_under_a_temporary_name_with_the_permissions_of_the_umask(tmp_path, saved, tool):
    from megatron_jp.files import chmod_as_created, output_file, umask

    _, trained = saved
    old = os.umask(0o027)
    try:
        assert umask() == 0o027
        assert tool("convert_to_hf")(["--checkpoint", str(trained), "--output", str(tmp_path / "hf")]) == 0
        with output_file(tmp_path / "summary.json") as tmp:
            assert tmp.name.startswith(".summary.json.") and not (tmp_path / "summary.json").exists()
            tmp.write_text("{}")
        made = tmp_path / "made"
        made.mkdir()
        chmod_as_created(made, folder=True)
    finally:
        os.umask(old)
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o750
    assert {(f.stat().st_mode & 0o777) for f in (tmp_path / "hf").iterdir()} == {0o640}
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o640
