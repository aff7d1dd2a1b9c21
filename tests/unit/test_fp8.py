"""FP8 training through torchao, emulated on CPU (models/float8.py, the linear seam of models/linear.py).

Tolerance of FP8 against bf16, derived rather than picked: a value rounds to e4m3 (3 mantissa bits)
with relative error up to 2^-4, to bf16 (7 bits) with up to 2^-8, 16 times less. Rounding errors of
one kind enter the run the same way whatever their size, so an FP8 run may drift from the bf16 run by
up to 16 times as far as the bf16 run drifts from fp32 on the same steps (measured in the test, not
assumed). Measured on the tiny model over 50 steps: bf16 vs fp32 1.1e-3 relative, FP8 vs bf16
6.4e-3 (tensorwise) and 2.9e-3 (rowwise), within 1.8e-2.
"""

import numpy as np
import pytest
import torch
from torch import nn

from megatron_jp.config import Config, ConfigError, OptimConfig, validate
from megatron_jp.models.config import preset
from megatron_jp.models.float8 import BLOCK_LINEARS, is_block_linear
from megatron_jp.models.linear import linear, swap_linears
from megatron_jp.parallel import ParallelDims, build_optimizer, build_parallel_model, train_step
from megatron_jp.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_jp.parallel.testing import synthetic_micro_batches
from megatron_jp.precision import Precision

torchao_float8 = pytest.importorskip("torchao.float8")  # the fp8 extra (tools/setup_venv.sh installs it)
Float8Linear = pytest.importorskip("torchao.float8.float8_linear").Float8Linear

ONE = ParallelDims.layout(1, 1, 1)
STEPS, LR = 50, 1e-3
FP8_OVER_BF16 = 2 ** -4 / 2 ** -8  # e4m3's rounding unit over bf16's


def losses(precision: str, recipe: str = "tensorwise") -> np.ndarray:
    """STEPS steps of the tiny model on ten repeating synthetic batches."""
    cfg = Config(model=preset("tiny", vocab_size=128), optim=OptimConfig(lr=LR, weight_decay=0.01))
    model = build_parallel_model(cfg.model, ONE, seed=3, precision=Precision.decode(precision, recipe))
    optimizer = build_optimizer(model, cfg.optim, ONE)
    return np.array([train_step(model, optimizer, synthetic_micro_batches(1000 + s % 10, 2, 2, 32, 128), ONE,
                                LR).loss for s in range(STEPS)])


@pytest.fixture(scope="module")
def references():
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        return {"fp32": losses("fp32"), "bf16": losses("bf16")}


def relative_drift(run: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(run - ref) / ref))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fifty_fp8_steps_stay_within_sixteen_times_the_bf16_drift_of_the_bf16_run(references, recipe, one_thread):
    fp8 = losses("fp8", recipe)
    bf16_drift = relative_drift(references["bf16"], references["fp32"])
    drift = relative_drift(fp8, references["bf16"])
    assert 0 < drift <= FP8_OVER_BF16 * bf16_drift, (drift, bf16_drift)  # 0: the FP8 path did run
    assert fp8[-1] < 0.75 * fp8[0]  # and it learns (4.85 -> 3.36 in bf16)


def test_fp8_swaps_the_blocks_linears_only_and_keeps_every_parameter_name():
    cfg = preset("tiny-bert", vocab_size=128)  # biases everywhere, a transform head
    fp8 = build_parallel_model(cfg, ONE, precision=Precision.decode("fp8"))
    bf16 = build_parallel_model(cfg, ONE, precision=Precision.decode("bf16"))
    swapped = {name for name, m in fp8.chunks[0].named_modules() if isinstance(m, Float8Linear)}
    assert swapped == {f"layers.{i}.{part}" for i in range(cfg.num_layers) for part in BLOCK_LINEARS}
    assert [n for n, _ in fp8.named_parameters()] == [n for n, _ in bf16.named_parameters()]
    assert {p.dtype for p in fp8.parameters()} == {torch.bfloat16}


def test_a_swapped_tensor_parallel_linear_keeps_its_collectives_and_its_parameters():
    model = nn.Module()
    model.col = linear(32, 16, True, ColumnParallelLinear, group=None)
    model.row = linear(16, 32, True, RowParallelLinear, group=None, sequence_parallel=False)
    weights = [model.col.weight, model.col.bias, model.row.weight, model.row.bias]
    config = torchao_float8.Float8LinearConfig(emulate=True)
    swapped = swap_linears(model, lambda m: torchao_float8.convert_to_float8_training(m, config=config),
                           lambda m, name: True)
    assert swapped == ["col", "row"]
    assert isinstance(model.col, ColumnParallelLinear) and isinstance(model.col, Float8Linear)
    assert isinstance(model.row, RowParallelLinear) and isinstance(model.row, Float8Linear)
    assert model.col.group is None and model.row.sequence_parallel is False
    assert [model.col.weight, model.col.bias, model.row.weight, model.row.bias] == weights


def test_only_the_four_linears_of_a_block_are_block_linears():
    assert is_block_linear("layers.3.attn.qkv") and is_block_linear("layers.0.mlp.fc2")
    assert not is_block_linear("head.decoder") and not is_block_linear("head.dense")
    assert not is_block_linear("layers.3.attn") and not is_block_linear("layers.3.attn.qkv.inner")


@pytest.mark.parametrize("overrides, key", [({"ffn_hidden_size": 120}, "model.ffn_hidden_size"),
                                            ({"num_kv_heads": 1, "head_dim": 12}, "attn.qkv weight 72 x 64")])
def test_fp8_refuses_dims_that_are_not_multiples_of_16_naming_the_key(overrides, key):
    cfg = Config(model=preset("tiny", vocab_size=128, **overrides))
    cfg.train.precision = "fp8"
    with pytest.raises(ConfigError, match=f"train.precision fp8.*{key}"):
        validate(cfg, 1)
    cfg.train.precision = "bf16"
    validate(cfg, 1)  # the same shapes train in bf16


def test_fp8_shapes_are_checked_per_tensor_parallel_shard():
    cfg = Config(model=preset("tiny", vocab_size=128, ffn_hidden_size=96))  # 96 / 4 = 24 per rank
    cfg.train.precision, cfg.parallel.tensor = "fp8", 4
    with pytest.raises(ConfigError, match="mlp.fc2 weight 64 x 24 per tensor-parallel rank"):
        validate(cfg, 4)


def test_precision_decodes_the_config_once_into_dtypes_master_policy_and_peak():
    fp8 = Precision.decode("fp8", "rowwise", "bf16")
    assert (fp8.params, fp8.master, fp8.grad_reduce, fp8.fp8_recipe) == (torch.bfloat16, torch.float32,
                                                                        torch.bfloat16, "rowwise")
    assert fp8.separate_master and fp8.activation_bytes == 2 and fp8.peak_flops == 1978.9e12
    fp32 = Precision.decode("fp32")
    assert not fp32.separate_master and not fp32.fp8 and fp32.peak_flops == 989.4e12
    with pytest.raises(ValueError, match="fp16"):
        Precision.decode("fp16")
