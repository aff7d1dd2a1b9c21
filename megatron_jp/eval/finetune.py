"""Fine-tuning on a JGLUE task and scoring on its dev file; a sweep over the JGLUE paper's grid.

One run: the task model (megatron_jp.eval.heads) from the pretrained weights, AdamW with linear
warmup over the first 10% of the steps then linear decay to 0 (transformers' defaults, which the
JGLUE baselines used: no weight decay, gradient clipping at 1.0), shuffled batches seeded by
`seed`, then one prediction per dev example. A sweep repeats this for every (lr, epochs, seed) and
keeps the run with the best dev score on the task's primary metric.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_jp.eval import squad
from megatron_jp.eval.heads import build_task_model
from megatron_jp.eval.records import write_predictions, write_result
from megatron_jp.eval.tasks import EPOCHS, LEARNING_RATES, Hyper, TaskSpec, task_metrics

MAX_GRAD_NORM = 1.0
EVAL_BATCH = 64


@dataclass
class RunResult:
    """The outcome of one fine-tuning run."""

    hyper: Hyper
    metrics: dict
    rows: list
    """predictions.jsonl rows: id, prediction, gold."""
    model_class: str
    """The task class or head that was trained."""
    seconds: float


# ----------------------------------------------------------------------------- inputs


def encode(spec: TaskSpec, tokenizer, examples: list, max_length: int) -> list:
    """Token ids per example: a dict, a list of dicts (one per choice), or QAFeatures for spans."""
    if spec.kind == "span":
        return squad.qa_features(examples, tokenizer, max_length)

    def one(a, b=None):
        enc = tokenizer(a, b, truncation=True, max_length=max_length, return_token_type_ids=True)
        return {"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"]}

    if spec.kind == "multiple_choice":
        return [[one(ex.texts[0], choice) for choice in ex.texts[1:]] for ex in examples]
    return [one(*ex.texts) for ex in examples]


def label_tensor(spec: TaskSpec, examples: list) -> torch.Tensor:
    if spec.kind == "regression":
        return torch.tensor([ex.label for ex in examples], dtype=torch.float32)
    return torch.tensor([spec.labels.index(ex.label) for ex in examples], dtype=torch.long)


def collate(items: list, pad_id: int, device) -> dict:
    """Right-padded (B, S) tensors, or (B, C, S) for lists of choices."""
    if isinstance(items[0], squad.QAFeature):
        items = [{"input_ids": f.input_ids, "token_type_ids": f.token_type_ids} for f in items]
    nested = isinstance(items[0], list)
    flat = [x for item in items for x in item] if nested else items
    S = max(len(x["input_ids"]) for x in flat)
    ids = torch.full((len(flat), S), pad_id, dtype=torch.long)
    types = torch.zeros((len(flat), S), dtype=torch.long)
    mask = torch.zeros((len(flat), S), dtype=torch.long)
    for row, x in enumerate(flat):
        n = len(x["input_ids"])
        ids[row, :n], types[row, :n], mask[row, :n] = torch.tensor(x["input_ids"]), torch.tensor(x["token_type_ids"]), 1
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    if nested:
        batch = {k: v.view(len(items), -1, S) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------- training


def task_loss(kind: str, logits: torch.Tensor, target) -> torch.Tensor:
    if kind == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), target)
    if kind == "span":
        start, end = target
        return (F.cross_entropy(logits[..., 0].float(), start) + F.cross_entropy(logits[..., 1].float(), end)) / 2
    return F.cross_entropy(logits.float(), target)


def learning_rate(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup to `peak`, then linear decay to 0 at `total` (transformers' linear schedule)."""
    if step < warmup:
        return peak * step / max(1, warmup)
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def targets_of(spec: TaskSpec, examples: list, features: list):
    if spec.kind == "span":
        return (torch.tensor([f.start for f in features]), torch.tensor([f.end for f in features]))
    return label_tensor(spec, examples)


def train(model, spec: TaskSpec, features: list, targets, hp: Hyper, pad_id: int, device, log) -> None:
    n = len(features)
    steps_per_epoch = math.ceil(n / hp.batch_size)
    total = steps_per_epoch * hp.epochs
    warmup = math.ceil(total * hp.warmup_ratio)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    order = torch.Generator().manual_seed(hp.seed)
    step = 0
    model.train()
    for epoch in range(hp.epochs):
        begin, losses = time.perf_counter(), []
        for chunk in torch.randperm(n, generator=order).split(hp.batch_size):
            index = chunk.tolist()
            batch = collate([features[i] for i in index], pad_id, device)
            target = tuple(t[chunk].to(device) for t in targets) if spec.kind == "span" else targets[chunk].to(device)
            loss = task_loss(spec.kind, model(**batch), target)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total, warmup, hp.lr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            losses.append(loss.item())
            step += 1
        log(f"  epoch {epoch + 1}/{hp.epochs}: loss {sum(losses) / len(losses):.4f} "
            f"({time.perf_counter() - begin:.1f} s)")


@torch.no_grad()
def predict_logits(model, features: list, pad_id: int, device) -> list[torch.Tensor]:
    model.eval()
    out = []
    for start in range(0, len(features), EVAL_BATCH):
        batch = collate(features[start:start + EVAL_BATCH], pad_id, device)
        out.extend(model(**batch).float().cpu())
    return out


def prediction_rows(spec: TaskSpec, examples: list, features: list, logits: list) -> list[dict]:
    if spec.kind == "span":
        texts = squad.predict_answers(examples, features, [l[:, 0].numpy() for l in logits],
                                      [l[:, 1].numpy() for l in logits])
        return [{"id": ex.id, "prediction": t, "gold": ex.label} for ex, t in zip(examples, texts)]
    if spec.kind == "regression":
        return [{"id": ex.id, "prediction": float(l[0]), "gold": ex.label} for ex, l in zip(examples, logits)]
    return [{"id": ex.id, "prediction": spec.labels[int(l.argmax())], "gold": ex.label}
            for ex, l in zip(examples, logits)]


def run_once(loaded, spec: TaskSpec, train_examples: list, valid_examples: list, hp: Hyper, log) -> RunResult:
    begin = time.perf_counter()
    max_length = hp.max_length or spec.max_length
    tokenizer, device = loaded.tokenizer, loaded.device
    if hp.max_train_examples:
        train_examples = train_examples[:hp.max_train_examples]
    train_features = encode(spec, tokenizer, train_examples, max_length)
    valid_features = encode(spec, tokenizer, valid_examples, max_length)
    torch.manual_seed(hp.seed)  # the new head's initialisation, and dropout
    num_labels = 1 if spec.kind == "regression" else max(1, len(spec.labels))
    model = build_task_model(loaded, spec.kind, num_labels).to(loaded.device)
    log(f"fine-tuning {model.description} on {len(train_examples)} examples: lr {hp.lr:g}, {hp.epochs} epochs, "
        f"seed {hp.seed}, max length {max_length}, batch {hp.batch_size}")
    train(model, spec, train_features, targets_of(spec, train_examples, train_features), hp,
          tokenizer.pad_token_id, device, log)
    logits = predict_logits(model, valid_features, tokenizer.pad_token_id, device)
    rows = prediction_rows(spec, valid_examples, valid_features, logits)
    metrics = task_metrics(spec, [r["prediction"] for r in rows], [r["gold"] for r in rows])
    return RunResult(replace(hp, max_length=max_length), metrics, rows, model.description,
                     time.perf_counter() - begin)


def sweep_grid(hp: Hyper, seeds: list[int], lrs=LEARNING_RATES, epochs=EPOCHS) -> list[Hyper]:
    return [replace(hp, lr=lr, epochs=e, seed=s) for lr, e, s in itertools.product(lrs, epochs, seeds)]


def run_name(hp: Hyper) -> str:
    return f"lr{hp.lr:g}_ep{hp.epochs}_seed{hp.seed}"


def finetune(loaded, spec: TaskSpec, train_examples: list, valid_examples: list, grid: list[Hyper],
             output: str | Path, model_info: dict, log=None) -> dict:
    """Run every configuration of `grid`; write the best run's predictions and return its result."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    output = Path(output)
    runs = []
    for hp in grid:
        run = run_once(loaded, spec, train_examples, valid_examples, hp, log)
        log(f"  dev {spec.primary} {run.metrics[spec.primary]:.4f} ({run.seconds:.1f} s)")
        if len(grid) > 1:
            folder = output / "sweep" / run_name(hp)
            write_predictions(folder, run.rows)
            write_result(folder, result_record(spec, run, loaded, model_info))
        runs.append(run)
    best = max(runs, key=lambda r: r.metrics[spec.primary])
    result = result_record(spec, best, loaded, model_info)
    if len(grid) > 1:
        result["sweep"] = [{"config": asdict(r.hyper), "metrics": r.metrics} for r in runs]
    write_predictions(output, best.rows)
    write_result(output, result)
    return result


def result_record(spec: TaskSpec, run: RunResult, loaded, model_info: dict) -> dict:
    return {"task": spec.name, "metrics": run.metrics, "model": loaded.source, "model_info": model_info,
            "config": {**asdict(run.hyper), "task_model": run.model_class, "primary": spec.primary,
                       "seconds": round(run.seconds, 2)}}
