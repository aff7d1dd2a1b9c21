"""JGLUE tasks read from local files (JGLUE v1.3 / JCoLA v1.0 formats), and their metrics.

| task           | file (JSONL, one example per line)                               | metrics              |
| -------------- | ---------------------------------------------------------------- | -------------------- |
| marc_ja        | {review_id, sentence, label: positive / negative}                | accuracy             |
| jsts           | {sentence_pair_id, sentence1, sentence2, label: 0-5}             | pearson, spearman    |
| jnli           | {sentence_pair_id, sentence1, sentence2, label: entailment / contradiction / neutral} | accuracy |
| jcola          | {uid, sentence, label: 0 / 1} (JCoLA's own repository)           | accuracy, mcc        |
| jcommonsenseqa | {q_id, question, choice0 ... choice4, label: 0-4}                | accuracy             |
| jsquad         | SQuAD v1.1 JSON (megatron_jp.eval.squad)                         | exact_match, f1      |

Defaults follow the JGLUE paper (Kurihara et al., 2022): max length 512 / 128 / 128 / 64 / 384
tokens (MARC-ja, JSTS, JNLI, JCommonsenseQA, JSQuAD), warmup 10%, learning rates {5e-5, 3e-5,
2e-5}, epochs {3, 4}, dev-set scores. JCoLA is not in the paper: its sentences are short, 128.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_jp.eval.records import (EvalInputError, check_unique, field as get_field, number_field, read_jsonl,
                                      record_id, text_field)

LEARNING_RATES = (5e-5, 3e-5, 2e-5)
EPOCHS = (3, 4)
WARMUP_RATIO = 0.1


@dataclass(frozen=True)
class TaskSpec:
    """What a JGLUE task is, for reading, fine-tuning and scoring."""

    name: str
    """The --task name."""
    kind: str
    """classification | regression | multiple_choice | span."""
    max_length: int
    """Tokens per input (CLS and SEP included), the paper's setting."""
    primary: str
    """The metric a sweep maximises."""
    labels: tuple = ()
    """Classification: the label values in file order of their class index."""
    text_keys: tuple[str, ...] = ()
    """Fields holding the input text(s)."""
    id_keys: tuple[str, ...] = ()
    """Fields that hold an example's id (the first present is used)."""


TASKS = {t.name: t for t in (
    TaskSpec("marc_ja", "classification", 512, "accuracy", ("positive", "negative"), ("sentence",),
             ("review_id", "id")),
    TaskSpec("jsts", "regression", 128, "spearman", (), ("sentence1", "sentence2"), ("sentence_pair_id", "id")),
    TaskSpec("jnli", "classification", 128, "accuracy", ("entailment", "contradiction", "neutral"),
             ("sentence1", "sentence2"), ("sentence_pair_id", "id")),
    TaskSpec("jcola", "classification", 128, "mcc", (0, 1), ("sentence",), ("uid", "id")),
    TaskSpec("jcommonsenseqa", "multiple_choice", 64, "accuracy", (0, 1, 2, 3, 4), ("question",),
             ("q_id", "id")),
    TaskSpec("jsquad", "span", 384, "f1", (), ("question", "context"), ("id",)),
)}
NUM_CHOICES = 5
STS_RANGE = (0.0, 5.0)


@dataclass
class Example:
    """One sentence, sentence-pair or multiple-choice example."""

    id: str
    texts: tuple[str, ...]
    """One or two texts; for multiple choice the question then the choices."""
    label: object
    """The gold label as written in the file (a label string, a 0/1 int, a float score, a choice index)."""
    where: str = ""
    """FILE:LINE, for messages."""


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise EvalInputError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def read_examples(spec: TaskSpec, path: str) -> list:
    """Every example of a task file, validated (JSQuAD: squad.read_squad)."""
    if spec.kind == "span":
        from megatron_jp.eval.squad import read_squad

        return read_squad(path)
    examples = [_example(spec, where, record) for where, record in read_jsonl(path)]
    check_unique(((e.id, e.where) for e in examples), "example")
    return examples


def _example(spec: TaskSpec, where: str, record: dict) -> Example:
    ident = record_id(record, where, spec.id_keys)
    if spec.kind == "multiple_choice":
        texts = (text_field(record, "question", where),
                 *(text_field(record, f"choice{i}", where) for i in range(NUM_CHOICES)))
    else:
        texts = tuple(text_field(record, key, where) for key in spec.text_keys)
    return Example(ident, texts, _label(spec, record, where), where)


def _label(spec: TaskSpec, record: dict, where: str):
    if spec.kind == "regression":
        return number_field(record, "label", where, *STS_RANGE)
    allowed = " / ".join(map(str, spec.labels))
    kind = str if isinstance(spec.labels[0], str) else int
    value = get_field(record, "label", where, kind, f"one of {allowed}")
    if value not in spec.labels:
        raise EvalInputError(f"{where}: label {value!r} is not a {spec.name} label; expected one of {allowed}")
    return value


# ----------------------------------------------------------------------------- metrics


def classification_metrics(spec: TaskSpec, predictions: list, golds: list) -> dict:
    from sklearn.metrics import accuracy_score, matthews_corrcoef

    metrics = {"accuracy": float(accuracy_score(golds, predictions))}
    if spec.name == "jcola":
        metrics["mcc"] = float(matthews_corrcoef(golds, predictions))
    return metrics


def correlation_metrics(predictions: list[float], golds: list[float]) -> dict:
    """Pearson and Spearman correlation; 0 when the predictions are constant (undefined)."""
    from scipy.stats import pearsonr, spearmanr

    p, g = np.asarray(predictions, dtype=np.float64), np.asarray(golds, dtype=np.float64)
    if len(p) < 2 or np.ptp(p) == 0 or np.ptp(g) == 0:
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": float(pearsonr(p, g)[0]), "spearman": float(spearmanr(p, g)[0])}


def task_metrics(spec: TaskSpec, predictions: list, golds: list) -> dict:
    if spec.kind == "regression":
        return correlation_metrics(predictions, golds)
    if spec.kind == "span":
        from megatron_jp.eval.squad import squad_metrics

        return squad_metrics(predictions, golds)
    return classification_metrics(spec, predictions, golds)


@dataclass
class Hyper:
    """One fine-tuning configuration."""

    lr: float = 3e-5
    """Peak learning rate (AdamW), reached after the warmup, then linear decay to 0."""
    epochs: int = 3
    """Passes over the training file."""
    seed: int = 42
    """Seeds the head's initialisation, the shuffling and dropout."""
    max_length: int = 0
    """Tokens per input; 0: the task's default."""
    batch_size: int = 32
    """Examples per optimizer step."""
    warmup_ratio: float = WARMUP_RATIO
    """Fraction of the steps with a linearly rising learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (transformers' run_glue default, which the JGLUE baselines used)."""
    max_train_examples: int = 0
    """Use only the first N training examples; 0: all."""
