"""The chunked linear + cross-entropy of parallel/loss.py against the unfused decoder and loss.

fp32 on CPU: the chunked loss sums the same per-token terms in another order and forms the same
gradients chunk by chunk, so both agree to ~1e-7 of their scale (a weight gradient is a sum over
hundreds of tokens: reassociation moves near-zero entries by that much in absolute terms). Errors are
held to 1e-5 of the largest expected value, as in tests/distributed/test_parallel_primitives.py,
while a wrong row, a missed chunk or an unscaled gradient is off by O(1).
"""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from megatron_jp.models.encoder import IGNORE_INDEX
from megatron_jp.parallel.loss import linear_cross_entropy, linear_cross_entropy_eval, vocab_parallel_cross_entropy


def inputs(N=300, H=24, V=97, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=gen, requires_grad=True)
    w = (torch.randn(V, H, generator=gen) * 0.3).requires_grad_()
    b = (torch.randn(V, generator=gen) * 0.1).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), generator=gen)
    t[::7] = IGNORE_INDEX  # the padding of a fixed-size prediction index
    return x, w, b, t


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk", [1, 64, 1000])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_loss_and_gradients_match_the_unfused_decoder_and_loss(chunk, bias):
    x, w, b, t = inputs(bias=bias)
    valid = t != IGNORE_INDEX
    unfused = F.cross_entropy(F.linear(x, w, b)[valid], t[valid], reduction="sum") * 0.37
    fused = linear_cross_entropy(x, w, b, t, chunk=chunk) * 0.37
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=0)
    for got, want in zip(grads(fused, (x, w, b)), grads(unfused, (x, w, b))):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_unfused_vocab_parallel_loss_ignores_padding_targets():
    x, w, b, t = inputs()
    logits = F.linear(x, w, b).detach().requires_grad_()
    losses = vocab_parallel_cross_entropy(logits, t, 0, None)
    assert torch.all(losses[t == IGNORE_INDEX] == 0)
    losses.sum().backward()
    assert torch.all(logits.grad[t == IGNORE_INDEX] == 0)


def test_chunked_evaluation_counts_loss_and_correct_predictions_of_valid_tokens():
    x, w, b, t = inputs()
    valid = t != IGNORE_INDEX
    logits = F.linear(x, w, b).detach()
    loss_sum, correct = linear_cross_entropy_eval(x.detach(), w.detach(), b.detach(), t, chunk=50)
    assert loss_sum.item() == pytest.approx(F.cross_entropy(logits[valid], t[valid], reduction="sum").item(),
                                            rel=1e-6)
    assert correct.item() == (logits.argmax(-1) == t)[valid].sum().item()


PEAK = textwrap.dedent("""
    import resource, sys, torch, torch.nn.functional as F
    from megatron_jp.parallel.loss import linear_cross_entropy
    torch.set_num_threads(1)
    N, H, V = 4096, 64, 16384
    x = torch.randn(N, H, requires_grad=True); w = (torch.randn(V, H) * 0.1).requires_grad_()
    t = torch.randint(0, V, (N,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.argv[1] == "fused":
        loss = linear_cross_entropy(x, w, None, t, chunk=256)
    else:
        loss = F.cross_entropy(F.linear(x, w).float(), t, reduction="sum")
    loss.backward()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
""")


def peak_bytes(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PEAK, mode], capture_output=True, text=True, check=True, timeout=300)
    return int(out.stdout.strip())


def test_chunked_loss_never_holds_the_full_logits():
    logits_bytes = 4096 * 16384 * 4  # 256 MiB of fp32 logits
    fused, unfused = peak_bytes("fused"), peak_bytes("unfused")
    print(f"peak over baseline: fused {fused / 2**20:.0f} MiB, unfused {unfused / 2**20:.0f} MiB "
          f"(full logits {logits_bytes / 2**20:.0f} MiB)")
    assert unfused >= 2 * logits_bytes  # logits, softmax and their gradient (at least two alive at once)
    assert fused < logits_bytes / 4  # one 256-token chunk (16 MiB) plus the weight's gradient
