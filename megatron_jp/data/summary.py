"""The start-up table of a blend: per source its documents, tokens, rows and the epochs a run takes.

    data: 2 sources, 800 steps = 12,800 samples at seq_length 128
      weight  realised  documents  empty       tokens  rows@128  epochs  source
       0.700     0.700         72      0       49,084       400   22.40  data/wiki_text_document
       ...

Epochs of a source = sum over seq-length stages of (samples of the stage x realised weight) / rows
of the source at that stage's length: how many times the run sees each document.
"""

from __future__ import annotations

MAX_NOTES = 5


def stage_samples(seq_length_at, total_steps: int, consumed_at) -> list[tuple[int, int]]:
    """[(seq_length, samples)] of the run: one entry per stage of a StagedSchedule, else one."""
    stages = getattr(seq_length_at, "stages", None) or [(0, seq_length_at(0))]
    out = []
    for i, (start, length) in enumerate(stages):
        if start >= total_steps:
            break
        stop = min(stages[i + 1][0], total_steps) if i + 1 < len(stages) else total_steps
        out.append((int(length), consumed_at(stop) - consumed_at(start)))
    return out


def blend_summary(mlm, stages: list[tuple[int, int]], total_steps: int) -> str:
    """The table (see the module docstring) for an MLMDataset and the samples of each stage."""
    lengths = sorted({s for s, _ in stages})
    realised = mlm.blend.realized_weights
    samples = sum(n for _, n in stages)
    lines = [f"data: {len(mlm.sources)} sources, {total_steps:,} steps = {samples:,} samples at seq_length "
             + ", ".join(str(s) for s in lengths)]
    head = (f"  {'weight':>7} {'realised':>8} {'documents':>12} {'empty':>8} {'tokens':>16} "
            + " ".join(f"{'rows@' + str(s):>12}" for s in lengths) + f" {'epochs':>8}  source")
    lines.append(head)
    for d, src in enumerate(mlm.sources):
        first = src.index(lengths[0]).summary
        rows = {s: src.index(s).num_rows for s in lengths}
        epochs = sum(n * realised[d] / max(rows[s], 1) for s, n in stages)
        lines.append(f"  {mlm.weights[d]:7.3f} {realised[d]:8.3f} {first['documents']:12,} {first['empty_documents']:8,} "
                     f"{first['tokens']:16,} " + " ".join(f"{rows[s]:12,}" for s in lengths)
                     + f" {epochs:8.2f}  {src.prefix}")
    if mlm.cache is not None:
        lines.append("  " + mlm.cache.describe())
    lines += _notes(mlm)
    return "\n".join(lines)


def _notes(mlm) -> list[str]:
    notes, unchecked = list(mlm.notes), mlm.unchecked
    if unchecked:
        notes.append(f"{len(unchecked)} of {len(mlm.sources)} shards have no provenance sidecar (e.g. {unchecked[0]}): "
                     "their tokenizer is not checked (shards from Megatron-LM or an older megatron_jp)")
    for d, src in enumerate(mlm.sources):
        w, r = mlm.weights[d], mlm.blend.realized_weights[d]
        if w > 0 and abs(r - w) > 0.01 * w:
            notes.append(f"{src.prefix}: weight {w:.3g} is realised as {r:.3g} (the blend period "
                         f"{mlm.blend.period:,} is too short for it)")
    shown = [f"  note: {n}" for n in notes[:MAX_NOTES]]
    if len(notes) > MAX_NOTES:
        shown.append(f"  note: ... and {len(notes) - MAX_NOTES} more like these")
    return shown
