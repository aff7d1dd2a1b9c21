"""Typed run configuration: nested dataclasses, YAML files, dotted command-line overrides, validation.

Resolution order, later wins: dataclass defaults < the model preset < the YAML file < `--section.key
VALUE` overrides. Every field carries a docstring under it; `describe()` prints them.

Two kinds of checks, both naming the key and the fix (ConfigError):
- a field on its own, from its type (config_fields.py): choices are `Literal[...]`, numbers carry a
  `Range` (`Positive`, `Probability`, ...), curricula strings are parsed into `Stages` / `RampUp`.
  Run when a config is built from YAML or the command line, and again by `validate`;
- the fields together (heads vs hidden size, layers vs pipeline stages, batch vs data-parallel
  size...): `validate(cfg, world_size)`, run once per run at the boundary (the CLI, after the
  vocabulary is resolved), before any process group or allocation. Builders take validated values.

The model's own section, `ModelConfig`, and the presets live one floor below, in models/config.py;
this module imports nothing else of the package but the field types and the precision rules
(megatron_jp/precision.py).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

# the field types: the sections' annotations below are resolved in this module's namespace
from megatron_jp.config_fields import (Beta, Blend, Checked, ConfigError, NonNegative, NonNegativeFloat,  # noqa: F401
                                       OpenUnit, Positive, PositiveFloat, Probability, RampUp, Seed, SeqLength,
                                       Stages, check_fields, coerce, require, section_fields)
from megatron_jp.models.config import ModelConfig, preset_fields
from megatron_jp.precision import FP8_MULTIPLE, fp8_shape_problems


# ----------------------------------------------------------------------------- sections


@dataclass
class DataConfig(Checked):
    """Where the tokens come from and how samples are built."""

    SECTION = "data"

    paths: Blend = Blend()
    """Megatron-style blend: "w1 prefix1 w2 prefix2" or one prefix (e.g. data/corpus_text_document)."""
    valid_paths: Blend = Blend()
    """Blend for validation. Empty: split off from `paths` by `split`."""
    split: str = "98,2"
    """Train,valid weights used to split `paths` when valid_paths is empty."""
    tokenizer_type: Literal["SentencePieceTokenizer", "HuggingFaceTokenizer", "ByteTokenizer"] = \
        "SentencePieceTokenizer"
    """SentencePieceTokenizer, HuggingFaceTokenizer or ByteTokenizer."""
    tokenizer_model: str = ""
    """Path of the .model file or tokenizer folder (unused for ByteTokenizer)."""
    seq_length: SeqLength = 512
    """Tokens per row, CLS and SEP included."""
    packing: Literal["none", "concat", "best_fit"] = "best_fit"
    """none (one document per row, padded), concat (back to back) or best_fit (minimal padding)."""
    mask_prob: OpenUnit = 0.15
    """Fraction of tokens selected for prediction."""
    mask_token_prob: Probability = 0.8
    """Of the selected tokens, the fraction replaced by the mask token."""
    random_token_prob: Probability = 0.1
    """Of the selected tokens, the fraction replaced by a random token (the rest stay unchanged)."""
    whole_word_masking: bool = False
    """Select whole words (from the _words shard written by preprocess_data --word-boundaries)."""
    seq_length_stages: Stages = Stages()
    """Sequence-length curriculum "STEP:LENGTH,...", e.g. "0:128,31000:256,250000:512" (RetrievaBERT).
    Empty: seq_length throughout."""
    mask_prob_stages: Stages = Stages()
    """Mask-rate curriculum "STEP:RATE,...", e.g. "0:0.5,200000:0.3" (byBERT). Empty: mask_prob."""
    num_workers: NonNegative = 1
    """DataLoader worker processes per rank."""
    cache_dir: str = ""
    """Folder of the sample indices (packed rows, blend table), built once and memory-mapped by every
    rank (tools/build_index.py builds them ahead). Empty: index-cache/ next to the first shard of
    paths; set it when that folder is read-only."""
    ignore_tokenizer_mismatch: bool = False
    """Train on shards whose provenance sidecar names another tokenizer than tokenizer_type /
    tokenizer_model (experts only: the ids must mean the same)."""
    keep_empty_documents: bool = False
    """Zero-token documents become [CLS][SEP] pieces instead of being dropped (counted either way)."""


@dataclass
class TrainConfig(Checked):
    """Length and shape of training."""

    SECTION = "train"

    steps: Positive = 100
    """Optimizer steps."""
    global_batch_size: Positive = 8
    """Sequences per optimizer step over all data-parallel ranks."""
    micro_batch_size: Positive = 4
    """Sequences per forward pass on one rank; the rest is gradient accumulation."""
    seed: Seed = 1234
    """Seeds initialisation, masking and data order."""
    precision: Literal["fp32", "bf16", "fp8"] = "fp32"
    """fp32; bf16 (bf16 weights/activations, fp32 master weights and gradient accumulation); or fp8
    (bf16, with the blocks' linears running FP8 GEMMs through torchao; emulated where CUDA FP8 tensor
    cores are absent). Read through megatron_jp.precision.Precision."""
    fp8_recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
    """train.precision fp8 only: torchao's scaling, tensorwise (one scale per tensor, fastest) or
    rowwise (one per row: more accurate with outliers)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: none, selective (core attention) or full (whole blocks)."""
    rampup_batch_size: RampUp | None = None
    """Global batch-size ramp-up "START INCREMENT STEPS": from START, growing by INCREMENT in equal
    stages until global_batch_size is reached at step STEPS. Empty: no ramp-up."""
    max_skipped_steps: Positive = 5
    """A step whose loss or gradient norm is NaN/inf is skipped (no update) and counted; this many
    skipped in a row abort the run."""
    compile: bool | None = None
    """torch.compile every transformer block (one graph per block, dynamic shapes: seq-length
    curricula and document layouts do not recompile). Empty/auto: on for CUDA, off on CPU."""
    device_memory_gb: PositiveFloat = 80.0
    """Memory of one accelerator; the dry run and the trainer warn when the memory plan exceeds it."""
    compile_cache_dir: str = ""
    """Inductor and Triton caches; a restarted job reuses the compiled kernels instead of compiling
    again for minutes under the collective timeout. Empty: RUN_DIR/compile_cache."""


@dataclass
class OptimConfig(Checked):
    """AdamW and its learning-rate schedule."""

    SECTION = "optim"

    lr: PositiveFloat = 1e-3
    """Peak learning rate."""
    min_lr: NonNegativeFloat = 0.0
    """Floor of the decay."""
    schedule: Literal["linear", "cosine", "constant", "wsd"] = "cosine"
    """linear, cosine, constant or wsd (warmup-stable-decay with 1-sqrt decay)."""
    warmup_steps: NonNegative = 0
    """Linear warmup from 0 to lr."""
    decay_steps: NonNegative = 0
    """wsd only: length of the final decay. 0: 10% of train.steps."""
    weight_decay: NonNegativeFloat = 0.01
    """AdamW decoupled weight decay (never on norms and biases)."""
    clip_grad: NonNegativeFloat = 1.0
    """Global gradient-norm clip; 0 disables."""
    beta1: Beta = 0.9
    """Adam beta1."""
    beta2: Beta = 0.98
    """Adam beta2."""
    eps: PositiveFloat = 1e-6
    """Adam epsilon."""


@dataclass
class ParallelConfig(Checked):
    """How ranks are split: world = pipeline x data x tensor."""

    SECTION = "parallel"

    tensor: Positive = 1
    """Tensor-parallel size (heads, MLP and vocabulary sharded)."""
    pipeline: Positive = 1
    """Pipeline-parallel stages."""
    virtual_pipeline: Positive = 1
    """Model chunks per pipeline rank (interleaved 1F1B when > 1)."""
    data: NonNegative = 0
    """Data-parallel size. 0: world size / (tensor x pipeline)."""
    sequence_parallel: bool = False
    """Shard norm/dropout regions over the sequence within a tensor-parallel group."""
    zero1: bool = False
    """Shard optimizer state and fp32 master weights over data-parallel ranks."""
    timeout_minutes: PositiveFloat = 10.0
    """A rank that makes no progress for this long (a collective that never completes: a frozen, dead
    or unreachable peer) makes every rank exit with a message naming the step and the stuck rank.
    torch.distributed's own collective timeout is set a minute longer, as a backstop."""
    startup_timeout_minutes: PositiveFloat = 5.0
    """Start-up (rendezvous, process groups): if the ranks have not all joined within this long, each
    exits naming those that never arrived; shorter than timeout_minutes so that a wrong MASTER_ADDR
    or a dead node is reported quickly. Raise it when some ranks prepare data long before joining."""
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Data type of the data-parallel gradient sums. bf16 halves their traffic: each rank's fp32
    gradient is rounded to bf16 (relative error 2^-9) and NCCL sums in bf16, so the step's gradient
    carries up to ~dp x 2^-9 relative error per element; accumulation buffers stay fp32."""


@dataclass
class CheckpointConfig(Checked):
    """Distributed checkpoints."""

    SECTION = "checkpoint"

    dir: str = ""
    """Checkpoint directory (iter_XXXXXXX/ folders and `latest`). Empty: RUN_DIR/checkpoints."""
    interval: NonNegative = 0
    """Save every N steps (and at the end); 0: only at the end."""
    keep: NonNegative = 2
    """Keep the last N checkpoints; 0 keeps all."""
    load: str = ""
    """Start a new phase from this checkpoint (a CKPT_DIR or an iter_* folder) when dir holds no
    `latest` yet; e.g. context extension with a new seq_length, rope_theta or data. Once the phase
    has saved, runs resume from dir/latest."""
    reset_optimizer: bool = False
    """With load: start from fresh AdamW moments instead of the loaded ones."""
    reset_schedule: bool = False
    """With load: restart the step count (learning-rate schedule, curricula) and the data position at 0."""
    async_save: bool = False
    """Write checkpoints in the background while training goes on (published when complete)."""
    allow_changes: str = ""
    """Comma-separated model keys (and/or `tokenizer`) that may differ from the checkpoint's when
    resuming or starting a phase, e.g. "activation,norm" (experts: the loaded weights were trained for
    the checkpoint's). A phase (checkpoint.load) may always change rope_theta, local_rope_theta,
    max_position_embeddings, sliding_window and the dropouts; a resume of the same run nothing."""


@dataclass
class RunConfig(Checked):
    """Where outputs go."""

    SECTION = "run"

    dir: str = "runs/default"
    """Run directory: metrics.jsonl, TensorBoard events, config copy."""


@dataclass
class LogConfig(Checked):
    """Console and metrics logging."""

    SECTION = "log"

    interval: Positive = 10
    """Log every N steps."""


@dataclass
class EvalConfig(Checked):
    """Periodic validation."""

    SECTION = "eval"

    interval: NonNegative = 0
    """Validate every N steps; 0 disables."""
    steps: Positive = 10
    """Micro-batches per validation."""
    intrinsic: bool = False
    """Also log masked-word accuracy at each validation: whole words of the validation documents masked
    at a fixed 15% (their _words shards), all as [MASK] (megatron_jp.training.probe)."""


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        """Plain nested dicts, as written to config.yaml (curricula as their strings)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_class(name: str):
    return typing.get_type_hints(Config)[name]

# ----------------------------------------------------------------------------- building from dicts


def _unknown_key(key: str, valid, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"{source}: unknown key {key!r}{hint}")


def _build_section(cls, values: dict, section: str, source: str, origins: dict[str, str]):
    fields = section_fields(cls)
    kwargs = {}
    for key, value in values.items():
        where = origins.get(f"{section}.{key}", source)
        if key not in fields:
            raise _unknown_key(f"{section}.{key}", [f"{section}.{k}" for k in fields], where)
        try:
            kwargs[key] = coerce(value, fields[key], f"{section}.{key}")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    try:
        return cls(**kwargs)  # checks the fields together where the section does (ModelConfig)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def config_from_dict(raw: dict, source: str = "config", origins: dict[str, str] | None = None) -> Config:
    """Build a Config from nested dicts (as parsed from YAML), applying the model preset; every field
    is checked on its own (types, choices, ranges). `origins`: "section.key" -> where its value came
    from, when not `source` (the command line's overrides of a YAML file)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    sections = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            raise _unknown_key(name, SECTIONS, source)
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping of keys, got {values!r}")
        sections[name] = dict(values)
    model = sections.get("model", {})
    if model.get("preset"):
        sections["model"] = {**preset_fields(str(model["preset"]), (origins or {}).get("model.preset", source)),
                             **model}
    built = {name: _build_section(_section_class(name), sections.get(name, {}), name, source, origins or {})
             for name in SECTIONS}
    return Config(**built)


def parse_overrides(args: list[str]) -> dict:
    """`--section.key VALUE` / `--section.key=VALUE` pairs -> nested dict of raw strings."""
    nested: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"command line: expected --section.key VALUE, got {arg!r}")
        if "=" in arg:
            dotted, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"command line: {arg} needs a value")
            dotted, value = arg[2:], args[i + 1]
            i += 2
        section, _, key = dotted.partition(".")
        if key in nested.get(section, {}):
            raise ConfigError(f"command line: --{dotted} is given twice ({nested[section][key]!r} and {value!r}); "
                              "keep one")
        nested.setdefault(section, {})[key] = value
    return nested


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (at any depth): YAML keeps the last
    silently, so `lr: 3.0e-3` and, further down, `lr: 300.0` would train with 300."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{self.name}: key {key!r} is given twice in one mapping, at lines {seen[key]} "
                                  f"and {line}; keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike) -> dict:
    """The sections of a YAML config file; every problem is a ConfigError naming the file."""
    try:
        loader = _UniqueKeyLoader(Path(path).read_text(encoding="utf-8"))
        loader.name = str(path)
        try:
            raw = loader.get_single_data() or {}
        finally:
            loader.dispose()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path} is a folder; give a YAML file (e.g. examples/quickstart.yaml)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, data:, ...)")
    return raw


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (refusing duplicated keys) and apply command-line overrides. Each field is
    checked on its own, an error naming where its value came from (the file or the command line);
    `validate` checks them together once the world size and vocabulary are known."""
    raw: dict = read_yaml(path) if path else {}
    origins: dict[str, str] = {}
    for section, values in parse_overrides(overrides or []).items():
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        raw[section] = {**(raw.get(section) or {}), **values}
        origins.update({f"{section}.{key}": "command line" for key in values})
    return config_from_dict(raw, str(path) if path else "command line", origins)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------- validation



def validate(cfg: Config, world_size: int):
    """Everything that can be refused before a process group exists, for `world_size` ranks."""
    for name in SECTIONS:
        check_fields(getattr(cfg, name), name)
    p = cfg.parallel
    require(p.virtual_pipeline == 1 or p.pipeline > 1, "parallel.virtual_pipeline > 1 needs parallel.pipeline > 1")
    validate_scale(cfg)
    validate_model(cfg.model, p.tensor, p.pipeline * p.virtual_pipeline)
    validate_training(cfg)
    validate_layout(cfg, world_size)


NODE_GPUS = 8  # the largest node the presets are planned for (8 x H100)
SCALE_MARGIN = 10  # refuse only what is absurd: 10 such nodes' memory for the fp32 weights alone


def rough_parameters(m: ModelConfig) -> int:
    """An upper-bound estimate of the parameter count from the fields alone (no model is built: a
    billion layers must be refused, not constructed): embeddings and head, attention and FFN per layer."""
    attention = 2 * m.hidden_size * m.head_dim * (m.num_heads + m.num_kv_heads)
    layer = attention + 3 * m.hidden_size * m.ffn_hidden_size + 4 * m.hidden_size
    vocab = max(m.vocab_size, 1) + m.max_position_embeddings + m.type_vocab_size
    return 2 * vocab * m.hidden_size + m.num_layers * layer


def validate_scale(cfg: Config):
    """Refuse a model whose fp32 weights alone exceed SCALE_MARGIN nodes' memory before anything is
    built from it: such numbers are typos (1e12 for 1e3), and building them hangs or overflows deep."""
    limit = SCALE_MARGIN * NODE_GPUS * cfg.train.device_memory_gb * 1e9
    need = 4 * rough_parameters(cfg.model)
    require(need <= limit, f"model: about {need / 1e12:,.0f} TB of fp32 weights alone (hidden_size "
                          f"{cfg.model.hidden_size}, num_layers {cfg.model.num_layers}, ffn_hidden_size "
                          f"{cfg.model.ffn_hidden_size}), more than {SCALE_MARGIN} nodes of {NODE_GPUS} x "
                          f"{cfg.train.device_memory_gb:g} GB hold: check these keys for a typo")


def validate_model(m: ModelConfig, tensor: int = 1, chunks: int = 1):
    """The model against `tensor`-way sharding and `chunks` pipeline chunks (its own shape was
    checked when it was built)."""
    require(m.num_heads % tensor == 0,
           f"model.num_heads ({m.num_heads}) must be divisible by parallel.tensor ({tensor})")
    kv = m.num_kv_heads
    require(kv % tensor == 0 or tensor % kv == 0,
           f"model.num_kv_heads ({kv}) and parallel.tensor ({tensor}) must divide one another")
    require(m.ffn_hidden_size % tensor == 0,
           f"model.ffn_hidden_size ({m.ffn_hidden_size}) must be divisible by parallel.tensor ({tensor})")
    require(m.vocab_size % tensor == 0,
           f"model.vocab_size ({m.vocab_size}) must be divisible by parallel.tensor ({tensor}); "
           f"set model.vocab_size to a multiple, or 0 to pad the tokenizer's size automatically")
    require(m.num_layers % chunks == 0,
           f"model.num_layers ({m.num_layers}) must be divisible by parallel.pipeline x "
           f"parallel.virtual_pipeline ({chunks})")


def validate_training(cfg: Config):
    d, t, o, m = cfg.data, cfg.train, cfg.optim, cfg.model
    require(d.mask_token_prob + d.random_token_prob <= 1.0,
           "data.mask_token_prob + data.random_token_prob must lie in [0, 1] (80/10/10 is 0.8 and 0.1)")
    require(not (d.cache_dir and Path(d.cache_dir).is_file()),
           f"data.cache_dir ({d.cache_dir}) is a file; name a folder")
    for length in d.seq_length_stages.values():
        require(isinstance(length, int) and length >= 8,
               f"data.seq_length_stages: length {length} must be an integer >= 8")
    for length in [d.seq_length, *d.seq_length_stages.values()]:
        require(m.position_embedding != "learned" or length <= m.max_position_embeddings,
               f"data.seq_length ({length}, or a stage of data.seq_length_stages) exceeds "
               f"model.max_position_embeddings ({m.max_position_embeddings}) of the learned position table")
    for rate in d.mask_prob_stages.values():
        require(0.0 < rate < 1.0, f"data.mask_prob_stages: rate {rate} must be in (0, 1)")
    require(t.global_batch_size % t.micro_batch_size == 0,
           f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
           f"train.micro_batch_size ({t.micro_batch_size})")
    require(o.min_lr <= o.lr, f"need optim.min_lr ({o.min_lr}) <= optim.lr ({o.lr})")
    require(o.warmup_steps <= t.steps, f"optim.warmup_steps ({o.warmup_steps}) must not exceed train.steps ({t.steps})")
    require(o.schedule != "wsd" or o.warmup_steps + o.decay_steps <= t.steps,
           f"optim.warmup_steps + optim.decay_steps ({o.warmup_steps} + {o.decay_steps}) must not exceed "
           f"train.steps ({t.steps}) for the wsd schedule")
    if t.precision == "fp8":
        require(not (problems := fp8_shape_problems(m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim,
                                                   m.ffn_hidden_size, m.gated, cfg.parallel.tensor)),
               f"train.precision fp8: FP8 GEMMs need weight dims that are multiples of {FP8_MULTIPLE}; "
               f"{'; '.join(problems)}. Change those keys or use train.precision bf16")
    ramp = t.rampup_batch_size
    require(ramp is None or ramp.start <= t.global_batch_size,
           f"train.rampup_batch_size starts at {ramp.start if ramp else 0}, above train.global_batch_size "
           f"({t.global_batch_size}): a ramp-up grows towards the global batch size")


def data_parallel_size(cfg: Config, world_size: int) -> int:
    model_parallel = cfg.parallel.tensor * cfg.parallel.pipeline
    return cfg.parallel.data or max(world_size // model_parallel, 1)


def validate_layout(cfg: Config, world_size: int):
    p, t = cfg.parallel, cfg.train
    mp = p.tensor * p.pipeline
    require(world_size % mp == 0,
           f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline "
           f"({p.tensor} x {p.pipeline} = {mp}); launch a multiple of {mp} processes")
    dp = data_parallel_size(cfg, world_size)
    require(p.data in (0, world_size // mp),
           f"parallel.data ({p.data}) does not match world size {world_size} / {mp} = {world_size // mp}; "
           f"set parallel.data to 0 to derive it")
    per_step = t.micro_batch_size * dp
    require(t.global_batch_size % per_step == 0,
           f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
           f"train.micro_batch_size x data-parallel size ({t.micro_batch_size} x {dp})")
    ramp = t.rampup_batch_size
    require(ramp is None or (ramp.start % per_step == 0 and ramp.increment % per_step == 0),
           f"train.rampup_batch_size: START and INCREMENT must be multiples of train.micro_batch_size x "
           f"data-parallel size ({t.micro_batch_size} x {dp})")
    if p.virtual_pipeline > 1:  # interleaved 1F1B runs micro-batches in groups of `pipeline`
        sizes = [t.global_batch_size] + ([ramp.start, ramp.increment] if ramp else [])
        require(all((size // per_step) % p.pipeline == 0 for size in sizes),
               f"parallel.virtual_pipeline > 1: the micro-batches per data-parallel rank (global batch "
               f"{t.global_batch_size} / ({t.micro_batch_size} x {dp}), and every ramp-up size) must be a "
               f"multiple of parallel.pipeline ({p.pipeline})")
    if p.sequence_parallel and p.tensor > 1:
        lengths = [cfg.data.seq_length, *cfg.data.seq_length_stages.values()]
        require(all(n % p.tensor == 0 for n in lengths),
               f"parallel.sequence_parallel: data.seq_length (and every seq_length stage) must be a multiple "
               f"of parallel.tensor ({p.tensor}), got {lengths}")


def padded_vocab_size(tokenizer_vocab: int, m: ModelConfig, tensor: int = 1) -> int:
    """The tokenizer's vocabulary rounded up so every tensor-parallel shard is a multiple of the pad."""
    multiple = m.make_vocab_size_divisible_by * tensor
    return -(-tokenizer_vocab // multiple) * multiple


def check_vocab(m: ModelConfig, tokenizer_vocab: int, source: str):
    require(m.vocab_size >= tokenizer_vocab,
           f"model.vocab_size ({m.vocab_size}) is smaller than the vocabulary of {source} ({tokenizer_vocab}); "
           f"raise it, or set it to 0 to take the tokenizer's size")


# ----------------------------------------------------------------------------- documentation


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def describe() -> str:
    """Every section and key with its default and docstring (printed by `train --help-config`)."""
    lines = []
    for name in SECTIONS:
        cls = _section_class(name)
        lines.append(f"{name}:  # {cls.__doc__}")
        defaults = _plain(cls())
        for key, doc in field_docs(cls).items():
            lines.append(f"  {key}: {defaults[key]!r}  # {doc}")
    return "\n".join(lines)


def _plain(section) -> dict:
    """A section as YAML-ready values: curricula back to their strings."""
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        out[f.name] = str(value) if isinstance(value, (Stages, RampUp, Blend)) else "" if value is None else value
    return out
