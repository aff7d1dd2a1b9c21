#!/usr/bin/env python
"""Average the model weights of several checkpoints (TohokuNLP's BERT averaged two) into a new one.

    python tools/average_checkpoints.py --checkpoints CKPT_A CKPT_B [...] --output OUT_DIR [--weights 0.5 0.5]
                                        [--iteration N]

Each CKPT is a checkpoint directory (uses `latest`) or an iter_* folder of any layout. The output is
a model-only checkpoint (no optimizer state) with the first checkpoint's config.yaml, named after the
newest input step: convert it with tools/convert_to_hf.py, or start a phase from it with
checkpoint.load (and checkpoint.reset_optimizer: true). OUT_DIR must not hold checkpoints yet (a run's
checkpoint directory is refused: its iteration of the same name and `latest` would be replaced), unless
--iteration N asks to add iter_N beside them (never replacing one; `latest` is left alone). Bad input
exits with status 2, a non-finite average with status 1, both before anything is written.
"""

from __future__ import annotations

import argparse
import math
import sys

from megatron_jp.files import inside
from megatron_jp.training.checkpoint import (CheckpointError, load_model_state, non_finite_names, read_meta,
                                             resolve_checkpoint, save_model_checkpoint)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint directories or iter_* folders")
    p.add_argument("--output", required=True, help="checkpoint directory to write (iter_* + latest)")
    p.add_argument("--weights", nargs="+", type=float, default=None,
                   help="one weight per checkpoint, summing to 1 (default: equal weights)")
    p.add_argument("--iteration", type=int, default=None,
                   help="write iter_N (a new folder) into an OUT_DIR that already holds checkpoints")
    args = p.parse_args(argv)
    if args.iteration is not None and args.iteration < 0:
        p.error(f"--iteration must be >= 0, got {args.iteration}")
    return args


def check_weights(weights: list[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"--weights {weights}: every weight must be a finite number")
    if len(weights) != count:
        raise ValueError(f"--weights has {len(weights)} values for {count} checkpoints: give one per checkpoint")
    if not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise ValueError(f"--weights sum to {sum(weights):g}: an average needs weights that sum to 1")
    return weights


def average(paths: list[str], weights: list[float]):
    """(config of the first checkpoint, weighted sum of the fp32 weights), one checkpoint in memory
    at a time besides the sum."""
    cfg, first = load_model_state(paths[0])
    total = {name: tensor * weights[0] for name, tensor in first.items()}  # separate tensors, even if tied
    del first
    for path, weight in zip(paths[1:], weights[1:]):
        _, state = load_model_state(path)
        for name in dict.fromkeys([*total, *state]):  # model order: the first difference
            want, got = total.get(name), state.get(name)
            if want is None or got is None or want.shape != got.shape:
                raise ValueError(f"{resolve_checkpoint(path)}: {name} is {_shape(got)} there and {_shape(want)} "
                                 f"in {resolve_checkpoint(paths[0])}; only checkpoints of one model can be averaged")
            want.add_(got, alpha=weight)
    return cfg, total


def _shape(tensor) -> str:
    return "absent" if tensor is None else str(tuple(tensor.shape))


def newest_step(paths: list[str]) -> int:
    return max(int(read_meta(resolve_checkpoint(p)).get("meta", {}).get("step", 0)) for p in paths)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        weights = check_weights(args.weights, len(args.checkpoints))
        for path in args.checkpoints:  # writing inside an iteration folder would change what it holds
            if inside(args.output, resolve_checkpoint(path)):
                raise ValueError(f"--output {args.output} lies inside the checkpoint it reads ({path}); name a "
                                 "checkpoint directory of its own")
        cfg, state = average(args.checkpoints, weights)
        step = newest_step(args.checkpoints) if args.iteration is None else args.iteration
        bad = non_finite_names(state)
        if bad:
            print(f"error: the average is not finite ({', '.join(bad[:5])}); nothing written", file=sys.stderr)
            return 1
        meta = {"averaged_from": [str(resolve_checkpoint(p)) for p in args.checkpoints], "weights": weights}
        folder = save_model_checkpoint(args.output, step, cfg, state, meta, into_existing=args.iteration is not None)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {folder}: the weighted average of {len(args.checkpoints)} checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
