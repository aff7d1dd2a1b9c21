"""Every tensor x pipeline x data layout trains exactly like the single-process model.

Each world size runs its cases in one spawned gloo job (parallel_jobs.py); the tests compare rank 0's
results with the single-process reference (plain Encoder, torch.optim.AdamW, clip_grad_norm_): the
loss and gradient norm of each of 5 steps, the evaluation loss and accuracy after them, and every
parameter gathered to its full name.

Tolerances. Layouts differ from the reference only by fp32 reassociation (partial sums per tensor
rank, gradient sums per data/pipeline rank, norms summed per shard): ~1e-7 relative per step.
Losses and norms: relative 1e-5. Parameters: absolute 1e-5 — Adam amplifies a gradient error by at
most lr / eps (its step is lr * g / (|g| + eps)), 1e-3 / 1e-6 = 1e3, so ulp-level gradient
differences on near-zero gradient elements move a parameter by ~1e-7..1e-6 over 5 steps, while a
wrong sum or shard moves parameters by ~lr = 1e-3.
"""

import pytest
import torch

import parallel_jobs as jobs
from megatron_jp.parallel.testing import spawn

LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-5


def case(model="tiny", job="parity", **layout):
    name = "-".join(f"{k}{int(v) if isinstance(v, bool) else v}" for k, v in layout.items())
    return {"job": job, "model": model, "id": f"{job}-{model}-{name}", **layout}


WORLD2 = [
    case(tp=2), case(tp=2, sp=True), case(pp=2), case(pp=2, vpp=2), case(dp=2), case(dp=2, zero1=True),
    case(tp=2, recompute="full"), case(pp=2, recompute="selective"),
    case("tiny-kv1", tp=2, sp=True, recompute="selective"),
    case("tiny-modernbert", pp=2), case("tiny-modernbert", pp=2, vpp=3), case("tiny-modernbert", tp=2, sp=True),
    case("tiny-bert", tp=2, sp=True),  # post-norm, biases everywhere, learned positions, token types
]
WORLD4 = [
    case(tp=2, pp=2), case(tp=2, pp=2, sp=True, recompute="full"), case(tp=2, dp=2, zero1=True, sp=True),
    case(tp=2, dp=2), case(pp=2, dp=2, zero1=True), case(pp=2, dp=2, vpp=2),
    case("tiny-modernbert", tp=2, pp=2, vpp=3, sp=True), case("tiny-kv1", tp=2, dp=2, zero1=True),
    case("tiny-bert", tp=2, pp=2, sp=True),
]
WORLD8 = [
    case(tp=2, pp=2, dp=2, zero1=True, sp=True, recompute="selective"),
    case(tp=2, pp=2, dp=2, vpp=2, recompute="full"),
    case("tiny-modernbert", tp=2, pp=2, dp=2, zero1=True, sp=True),
]
RESHARD = {"job": "reshard", "id": "reshard-tp2dp2-to-pp2vpp2dp2", "model": "tiny", "split": 3,
           "from": case(tp=2, dp=2, zero1=True), "to": case(pp=2, vpp=2, dp=2, zero1=True)}
MEMORY = [case(job="memory", tp=2, dp=2, zero1=True), case(job="memory", tp=2, dp=2, zero1=True, precision="bf16")]
BF16 = case(job="bf16", tp=2, dp=2, zero1=True, sp=True, precision="bf16")
BF16_REDUCE = [case(dp=4, zero1=True, reduce="bf16"), case(tp=2, dp=2, reduce="bf16")]
EXTRA4 = [RESHARD, *MEMORY, BF16, *BF16_REDUCE]
# FP8 (emulated) under TP, SP, PP, ZeRO-1 and recompute, both torchao recipes
FP8_WORLD2 = [case(tp=2, precision="fp8"), case(tp=2, sp=True, precision="fp8", recipe="rowwise")]
FP8_WORLD4 = [case(tp=2, pp=2, precision="fp8"),
              case(tp=2, dp=2, zero1=True, sp=True, recompute="full", precision="fp8")]


def run_world(tmp_path_factory, world, cases, timeout_s):
    out = tmp_path_factory.mktemp(f"world{world}")
    spawn(jobs.run_cases, world, (cases, str(out)), timeout_s=timeout_s)
    return {c["id"]: torch.load(out / f"{c['id']}.pt") for c in cases}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return run_world(tmp_path_factory, 2, WORLD2 + FP8_WORLD2, timeout_s=300)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return run_world(tmp_path_factory, 4, WORLD4 + EXTRA4 + FP8_WORLD4, timeout_s=360)


@pytest.fixture(scope="module")
def world8(tmp_path_factory):
    return run_world(tmp_path_factory, 8, WORLD8, timeout_s=300)


def assert_same_run(result, ref, first_step=0):
    for i, step in enumerate(result["steps"], start=first_step):
        assert abs(step["loss"] - ref["losses"][i]) <= LOSS_RTOL * ref["losses"][i], f"step {i} loss"
        assert abs(step["grad_norm"] - ref["norms"][i]) <= LOSS_RTOL * ref["norms"][i], f"step {i} grad norm"
    assert result["params"].keys() == ref["params"].keys()
    for name, want in ref["params"].items():
        error = (result["params"][name] - want).abs().max().item()
        assert error <= PARAM_ATOL, f"{name}: max abs error {error:.3g}"


def assert_same_eval(result, ref):
    assert result["eval"]["num_tokens"] == ref["eval"]["num_tokens"]
    assert abs(result["eval"]["loss"] - ref["eval"]["loss"]) <= LOSS_RTOL * ref["eval"]["loss"]
    assert result["eval"]["accuracy"] == pytest.approx(ref["eval"]["accuracy"], abs=1e-9)


@pytest.mark.parametrize("c", WORLD2, ids=[c["id"] for c in WORLD2])
def test_two_rank_layouts_train_like_one_process(world2, c):
    assert_same_run(world2[c["id"]], jobs.reference(c["model"]))
    assert_same_eval(world2[c["id"]], jobs.reference(c["model"]))


@pytest.mark.parametrize("c", WORLD4, ids=[c["id"] for c in WORLD4])
def test_four_rank_layouts_train_like_one_process(world4, c):
    assert_same_run(world4[c["id"]], jobs.reference(c["model"]))
    assert_same_eval(world4[c["id"]], jobs.reference(c["model"]))


@pytest.mark.parametrize("c", WORLD8, ids=[c["id"] for c in WORLD8])
def test_eight_rank_layouts_train_like_one_process(world8, c):
    assert_same_run(world8[c["id"]], jobs.reference(c["model"]))
    assert_same_eval(world8[c["id"]], jobs.reference(c["model"]))


def test_checkpoint_pieces_reload_into_another_layout_and_training_continues_identically(world4):
    # tp2 x dp2 with ZeRO-1 -> pp2 (interleaved, 2 virtual stages) x dp2 with ZeRO-1 after 3 of 5 steps
    result = world4[RESHARD["id"]]
    assert_same_run(result, jobs.reference("tiny"), first_step=RESHARD["split"])


@pytest.mark.parametrize("c", MEMORY, ids=[c["id"] for c in MEMORY])
def test_memory_estimate_is_within_ten_percent_of_allocated_buffers(world4, c):
    for coords, measured, estimate in world4[c["id"]]:
        for part in ("params", "grads", "optimizer"):
            assert abs(measured[part] - estimate[part]) <= 0.1 * measured[part], f"rank {coords} {part}"
        assert measured["optimizer"] > 0 and measured["params"] > 0


@pytest.mark.parametrize("c", BF16_REDUCE, ids=[c["id"] for c in BF16_REDUCE])
def test_bf16_gradient_sums_train_like_one_process_within_bf16_rounding(world4, c):
    """Each rank's gradient is rounded to bf16 (relative 2^-9 ~ 2e-3) before the data-parallel sum:
    the step's loss and norm move by ~1e-3 relative at most (1e-2 allowed). Parameters: where the
    ranks' contributions nearly cancel, rounding can flip the sign of the sum and Adam then steps by
    +-lr the other way, so single elements may move by up to 2 x lr per step, while typical elements
    move by ~lr x 2e-3; the mean error is held to lr / 10, which a gradient summed wrongly (another
    direction for Adam) exceeds."""
    result, ref = world4[c["id"]], jobs.reference(c["model"])
    for i, step in enumerate(result["steps"]):
        assert abs(step["loss"] - ref["losses"][i]) <= 1e-2 * ref["losses"][i], f"step {i} loss"
        assert abs(step["grad_norm"] - ref["norms"][i]) <= 1e-2 * ref["norms"][i], f"step {i} grad norm"
    for name, want in ref["params"].items():
        error = (result["params"][name] - want).abs()
        assert error.max().item() <= 2 * len(result["steps"]) * jobs.LR and error.mean().item() <= 1e-4, name


def test_bf16_training_lowers_the_loss_with_fp32_master_weights_and_gradients(world4):
    result = world4[BF16["id"]]
    losses, dtypes = result["losses"], result["dtypes"]
    assert losses[-1] < 0.8 * losses[0], losses  # ten steps on one batch at lr 1e-2: it must fit
    assert dtypes["params"] == {"torch.bfloat16"}
    assert dtypes["grads"] == {"torch.float32"} and dtypes["master"] == {"torch.float32"}
    assert dtypes["master_is_separate"]


@pytest.fixture(scope="module")
def fp8_reference(tmp_path_factory):
    """The single-process FP8 run of each recipe (the same job, world of one, this process)."""
    out = tmp_path_factory.mktemp("fp8-single")
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for recipe in ("tensorwise", "rowwise"):
            c = case(precision="fp8", recipe=recipe)
            jobs.parity(0, 1, c, str(out))
            runs[recipe] = torch.load(out / f"{c['id']}.pt")
    finally:
        torch.set_num_threads(threads)
    return runs


def assert_same_fp8_run(result, ref):
    """A layout's FP8 run against the single-process FP8 run. Each rank scales its FP8 casts by its own
    shard (a column shard's amax, a row-parallel input's partial rows), a finer scale than the whole
    tensor's, so products round differently by up to e4m3's 2^-4 relative; averaged over the ~10^3
    products of an output and the ~250 predicted tokens of a step, the loss moves by ~3e-4 relative
    (measured), 2e-3 allowed; the gradient norm, a sum of squares over fewer elements, by ~3e-3, 1e-2
    allowed. A lost collective or a wrong shard moves the loss by more than 1e-1. Parameters are bf16:
    masters a hair apart can round to neighbouring bf16 values, one ulp of the norm scales' 1.0
    (2^-7 = 7.8e-3), so single elements may differ by 1e-2 while the mean stays below lr (measured
    4e-4; a wrong gradient moves elements by ~lr per step)."""
    for i, (step, want) in enumerate(zip(result["steps"], ref["steps"])):
        assert abs(step["loss"] - want["loss"]) <= 2e-3 * want["loss"], f"step {i} loss"
        assert abs(step["grad_norm"] - want["grad_norm"]) <= 1e-2 * want["grad_norm"], f"step {i} grad norm"
    assert abs(result["eval"]["loss"] - ref["eval"]["loss"]) <= 2e-3 * ref["eval"]["loss"]
    assert result["params"].keys() == ref["params"].keys()
    for name, want in ref["params"].items():
        error = (result["params"][name] - want).abs()
        assert error.max().item() <= 1e-2 and error.mean().item() <= jobs.LR, name


@pytest.mark.parametrize("c", FP8_WORLD2, ids=[c["id"] for c in FP8_WORLD2])
def test_two_rank_fp8_layouts_train_like_the_single_process_fp8_run_within_fp8_rounding(world2, fp8_reference, c):
    assert_same_fp8_run(world2[c["id"]], fp8_reference[c.get("recipe", "tensorwise")])


@pytest.mark.parametrize("c", FP8_WORLD4, ids=[c["id"] for c in FP8_WORLD4])
def test_four_rank_fp8_layouts_train_like_the_single_process_fp8_run_within_fp8_rounding(world4, fp8_reference, c):
    assert_same_fp8_run(world4[c["id"]], fp8_reference[c.get("recipe", "tensorwise")])
