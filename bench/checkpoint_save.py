"""Peak memory and time of a checkpoint save (sync, then async twice), and the cost of the SHA-256
manifest on write and on load, for one process on CPU. Prints one JSON object.

    python bench/checkpoint_save.py --preset tohoku-bert-500m --dir /tmp/ckpt_bench   # the 581M case
    python bench/checkpoint_save.py --hidden 512 --layers 8 --ffn 2048 --vocab 8192  # what the test runs

"Training state" is what the process holds to train: parameters, their gradient buckets and the
optimizer's master/moment tensors. Peak memory is the resident set's high-water mark (VmHWM, reset
before each save through /proc/self/clear_refs), minus the resident set just before the save.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS


def state_bytes(model, optimizer) -> int:
    seen, total = set(), 0
    tensors = [i.param.data for i in model.infos] + [b.grads for b in model.grad_buffers.buckets]
    for shard in optimizer.shards:
        tensors += [shard.master, shard.exp_avg, shard.exp_avg_sq]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def measured_save(saver, step, model, optimizer) -> dict:
    before = rss_bytes()
    reset_peak()
    begin = time.perf_counter()
    saver.save(step, model, optimizer, meta={"step": step})
    returned = time.perf_counter() - begin
    saver.wait()
    return {"extra_bytes": rss_bytes("VmHWM") - before, "seconds_to_return": round(returned, 2),
            "seconds_to_publish": round(time.perf_counter() - begin, 2)}


def main():
    from megatron_jp.config import Config
    from megatron_jp.models.config import preset
    from megatron_jp.parallel import ParallelDims, build_optimizer, build_parallel_model, train_step
    from megatron_jp.parallel.testing import synthetic_micro_batches
    from megatron_jp.training.checkpoint import Checkpointer

    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dir", default="/tmp/checkpoint_save_bench")
    p.add_argument("--no-async", action="store_true")
    args = p.parse_args()
    model_cfg = preset(args.preset) if args.preset else preset(
        "tiny", hidden_size=args.hidden, num_layers=args.layers, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
        num_heads=8, num_kv_heads=4)
    cfg = Config(model=model_cfg)
    dims = ParallelDims.layout(1, 1, 1)
    model = build_parallel_model(cfg.model, dims, seed=1)
    optimizer = build_optimizer(model, cfg.optim, dims)
    train_step(model, optimizer, synthetic_micro_batches(0, 1, 1, args.seq, cfg.model.vocab_size), dims, 1e-4)
    out = {"parameters": sum(i.param.numel() for i in model.infos), "state_bytes": state_bytes(model, optimizer),
           "rss_after_step_bytes": rss_bytes()}
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    sync = Checkpointer(root / "sync", cfg, dims, keep=1)
    out["sync"] = measured_save(sync, 1, model, optimizer)
    out["checkpoint_bytes"] = sum(f.stat().st_size for f in (root / "sync").rglob("*") if f.is_file())
    out["sha256_seconds_on_write"] = round(getattr(sync, "hash_seconds", float("nan")), 2)
    begin = time.perf_counter()
    try:
        from megatron_jp.training.checkpoint import check_files, find_latest, read_meta

        folder = find_latest(root / "sync")
        check_files(folder, read_meta(folder))
        out["verify_seconds_on_load"] = round(time.perf_counter() - begin, 2)
    except TypeError:  # the code before the checksums
        out["verify_seconds_on_load"] = None
    if not args.no_async:
        shutil.rmtree(root / "sync", ignore_errors=True)
        background = Checkpointer(root / "async", cfg, dims, keep=1, async_save=True)
        out["async_first"] = measured_save(background, 2, model, optimizer)
        out["async_second"] = measured_save(background, 3, model, optimizer)
    shutil.rmtree(root, ignore_errors=True)
    for key in ("sync", "async_first", "async_second"):
        if key in out:
            out[key]["extra_fraction_of_state"] = round(out[key]["extra_bytes"] / out["state_bytes"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
