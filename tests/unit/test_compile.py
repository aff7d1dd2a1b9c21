"""Per-block torch.compile (parallel/compile.py) on CPU, traced by dynamo with the eager backend: the
graph capture is what is checked here (no graph break inside a block, no recompiles as shapes
change); Inductor's code generation is the GPU check's."""

import pytest
import torch
import torch._dynamo

from megatron_jp.models.config import preset
from megatron_jp.models.attention import AttentionContext
from megatron_jp.models.encoder import build_encoder
from megatron_jp.models.float8 import convert_to_fp8
from megatron_jp.parallel.compile import compile_blocks
from megatron_jp.parallel.testing import synthetic_micro_batches


class CountingBackend:
    """A dynamo backend that runs graphs eagerly and counts the graphs it was given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def run(model, S: int, train: bool, seed: int = 0):
    batch = synthetic_micro_batches(seed, 1, 2, S, model.cfg.vocab_size)[0]
    model.train(train)
    out = model(batch["input_ids"], batch["labels"], batch["segment_ids"], batch["position_ids"])
    if train:
        out.logits.float().square().mean().backward()
    return out.logits


def test_a_compiled_block_has_no_graph_break_and_computes_what_eager_does(one_thread):
    torch._dynamo.reset()
    eager = build_encoder(preset("tiny", vocab_size=96), seed=1)
    compiled = build_encoder(preset("tiny", vocab_size=96), seed=1)
    compile_blocks(compiled, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    torch.testing.assert_close(run(compiled, 40, True), run(eager, 40, True), rtol=0, atol=0)
    for (name, a), (_, b) in zip(compiled.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]


def test_seq_length_stages_and_document_layouts_do_not_recompile_blocks(one_thread):
    """ModernBERT's blocks come in three variants (layer 0 without its attention norm, global, local),
    each traced once for training and once for evaluation: 6 graphs, whatever the lengths."""
    torch._dynamo.reset()
    backend = CountingBackend()
    model = build_encoder(preset("tiny-modernbert", vocab_size=96), seed=0)
    compile_blocks(model, fullgraph=True, backend=backend)
    for S in (32, 48, 64, 96):  # a seq-length curriculum, and new document layouts at every batch
        run(model, S, train=True, seed=S)
    run(model, 80, train=False)
    run(model, 112, train=False)
    assert backend.graphs == 6
    assert backend.graphs <= torch._dynamo.config.recompile_limit


def test_the_context_of_a_batch_is_shared_by_every_compiled_block(one_thread):
    torch._dynamo.reset()
    model = build_encoder(preset("tiny-modernbert", vocab_size=96), seed=0)
    compile_blocks(model, fullgraph=True, backend="eager")
    batch = synthetic_micro_batches(3, 1, 2, 48, 96)[0]
    ctx = AttentionContext.build((2, 48), "cpu", batch["segment_ids"], batch["position_ids"], windows={0, 16})
    with torch.no_grad():
        shared = model.eval()(batch["input_ids"], batch["labels"], batch["segment_ids"], ctx=ctx).logits
        built = model(batch["input_ids"], batch["labels"], batch["segment_ids"], batch["position_ids"]).logits
    torch.testing.assert_close(shared, built, rtol=0, atol=0)


def test_fp8_blocks_compile_without_graph_break_forward_and_backward_and_compute_what_eager_does(one_thread):
    """torchao's Float8Linear (emulated) inside a fullgraph block, traced through AOTAutograd (the
    path Inductor takes on the GPU): the FP8 casts, scales and both GEMMs of backward are captured."""
    pytest.importorskip("torchao.float8")
    torch._dynamo.reset()
    models = []
    for compiled in (False, True):
        model = build_encoder(preset("tiny", vocab_size=96), seed=1, dtype=torch.bfloat16)
        convert_to_fp8(model, "tensorwise", emulate=True)
        if compiled:
            compile_blocks(model, fullgraph=True, backend="aot_eager")
        models.append((model, run(model, 40, True)))
    (eager, eager_logits), (compiled, compiled_logits) = models
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=0, atol=0)
    for (name, a), (_, b) in zip(compiled.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
