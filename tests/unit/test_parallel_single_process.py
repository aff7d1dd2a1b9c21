"""In one process the parallel model, its optimizer and its step are the plain model's, and the
memory estimate is what the buffers allocate."""

import pytest
import torch

from megatron_jp.config import Config, OptimConfig
from megatron_jp.models.config import preset
from megatron_jp.models.encoder import build_encoder
from megatron_jp.parallel import (ParallelDims, build_optimizer, build_parallel_model, eval_step, memory_breakdown,
                                  train_step)
from megatron_jp.precision import Precision
from megatron_jp.parallel.testing import reference_run, synthetic_micro_batches
from megatron_jp.parallel.adamw import adamw_update_, param_groups

LR = 1e-3
OPTIM = OptimConfig(lr=LR, clip_grad=0.5)  # a small clip threshold makes clipping active
ONE = ParallelDims.layout(1, 1, 1)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_adamw_update_matches_torch_adamw_step_for_step():
    torch.manual_seed(0)
    p_ref = torch.nn.Parameter(torch.randn(50))
    p = p_ref.detach().clone()
    m, v = torch.zeros(50), torch.zeros(50)
    opt = torch.optim.AdamW([p_ref], lr=LR, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, foreach=False)
    for step in range(1, 4):
        g = torch.randn(50)
        p_ref.grad = g.clone()
        opt.step()
        p.mul_(1 - LR * 0.1)
        adamw_update_([p], [g], [m], [v], step=step, lr=LR, beta1=0.9, beta2=0.98, eps=1e-6)
        # identical formula and operation order: equal up to the last ulp
        torch.testing.assert_close(p, p_ref.detach(), rtol=0, atol=1e-7)


def test_fused_adamw_kernel_matches_the_written_out_update():
    torch.manual_seed(0)
    p = [torch.randn(300), torch.randn(7)]  # several tensors in one call, as the optimizer's buckets
    q = [t.clone() for t in p]
    m, v, m2, v2 = ([torch.zeros_like(t) for t in p] for _ in range(4))
    for step in range(1, 4):
        g = [torch.randn_like(t) for t in p]
        adamw_update_(p, g, m, v, step=step, lr=LR, beta1=0.9, beta2=0.98, eps=1e-6, fused=False)
        adamw_update_(q, g, m2, v2, step=step, lr=LR, beta1=0.9, beta2=0.98, eps=1e-6, fused=True)
    # same formula, different operation order inside the kernel: ulp-level differences
    for got, want, moment, moment_want in zip(q, p, m2, m):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
        torch.testing.assert_close(moment, moment_want, rtol=0, atol=0)


def test_weight_decay_skips_norms_and_biases():
    model = build_encoder(preset("tiny-bert", vocab_size=128), device="meta")
    decayed, plain = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert plain["weight_decay"] == 0.0 and plain["params"]


@pytest.mark.parametrize("name", ["tiny", "tiny-modernbert", "tiny-bert"])
def test_single_process_parallel_model_trains_like_the_plain_encoder(name):
    cfg = preset(name, vocab_size=128)
    steps = [synthetic_micro_batches(s, 2, 2, 32, 128) for s in range(3)]
    losses, norms, state = reference_run(cfg, OPTIM, steps, seed=5, lr=LR)
    model = build_parallel_model(cfg, ONE, seed=5, bucket_size=5_000)
    optimizer = build_optimizer(model, OPTIM, ONE)
    for batches, loss, norm in zip(steps, losses, norms):
        out = train_step(model, optimizer, batches, ONE, LR)
        # same arithmetic up to summation order: fp32 reassociation, ~1e-7 relative
        assert out.loss == pytest.approx(loss, rel=1e-5) and out.grad_norm == pytest.approx(norm, rel=1e-5)
    full = model.full_state_dict()
    assert full.keys() == state.keys()
    for key, want in state.items():
        # Adam amplifies gradient ulps by at most lr / eps = 1e3 on near-zero gradients
        assert (full[key] - want).abs().max() <= 1e-5, key


def test_a_step_with_a_non_finite_loss_is_skipped_without_touching_weights_or_moments():
    cfg = preset("tiny", vocab_size=128)
    model = build_parallel_model(cfg, ONE, seed=5)
    optimizer = build_optimizer(model, OPTIM, ONE)
    batches = synthetic_micro_batches(0, 2, 2, 32, 128)
    train_step(model, optimizer, batches, ONE, LR)
    before = {i.spec.full_name: i.param.detach().clone() for i in model.infos}
    moments = [s.exp_avg.clone() for s in optimizer.shards]
    head = next(i.param for i in model.infos if i.spec.full_name == "final_norm.weight")
    saved = head.detach().clone()
    head.data.fill_(float("nan"))
    out = train_step(model, optimizer, batches, ONE, LR)
    head.data.copy_(saved)
    assert out.skipped and optimizer.step_count == 1
    assert all(torch.equal(i.param, before[i.spec.full_name]) for i in model.infos)
    assert all(torch.equal(s.exp_avg, m) for s, m in zip(optimizer.shards, moments))
    assert not train_step(model, optimizer, batches, ONE, LR).skipped and optimizer.step_count == 2


def test_eval_step_reports_the_plain_encoders_loss_and_accuracy():
    cfg = preset("tiny", vocab_size=128)
    batches = synthetic_micro_batches(9, 3, 2, 32, 128)
    model = build_parallel_model(cfg, ONE, seed=2)
    plain = build_encoder(cfg, seed=2).eval()
    out = eval_step(model, batches, ONE)
    with torch.no_grad():
        outputs = [plain(b["input_ids"], b["labels"], b["segment_ids"], b["position_ids"]) for b in batches]
    logits, targets = torch.cat([o.logits for o in outputs]), torch.cat([o.targets for o in outputs])
    assert out.num_tokens == targets.numel()
    assert out.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-5)
    assert out.accuracy == pytest.approx((logits.argmax(-1) == targets).float().mean().item(), abs=1e-9)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8"])
def test_memory_estimate_equals_the_single_process_buffers(precision):
    cfg = Config()
    cfg.model = preset("tiny", vocab_size=128)
    cfg.train.precision = precision
    model = build_parallel_model(cfg.model, ONE, precision=Precision.of(cfg))
    optimizer = build_optimizer(model, cfg.optim, ONE)
    params = sum(b.params.nbytes for b in model.grad_buffers.buckets)
    grads = sum(b.grads.nbytes for b in model.grad_buffers.buckets)
    masters = sum(s.master.nbytes for s in optimizer.shards if s.master.data_ptr() != s.params.data_ptr())
    state = sum(s.exp_avg.nbytes + s.exp_avg_sq.nbytes for s in optimizer.shards) + masters
    plan = memory_breakdown(cfg, 1)[0]
    assert {k: plan[k] for k in ("params", "grads", "optimizer")} == {"params": params, "grads": grads,
                                                                    "optimizer": state}
    assert plan["total"] == params + grads + state + plan["activations"]


def test_full_state_dict_round_trips_through_load_full_state_dict():
    cfg = preset("tiny-modernbert", vocab_size=128)
    source = build_parallel_model(cfg, ONE, seed=1).full_state_dict()
    target = build_parallel_model(cfg, ONE, seed=2)
    target.load_full_state_dict(source)
    for key, value in target.full_state_dict().items():
        assert torch.equal(value, source[key]), key
