"""What a checkpointed layer does again in its backward pass (train/speed: ``dequantize_once``, ``save_attention``).

Real components on the CPU: a tiny random-init Llama in 4-bit NF4 (bitsandbytes' CPU backend), peft's LoRA,
bf16 autocast, non-reentrant checkpointing, and torch.compile with inductor for the per-layer graphs.
"""

from __future__ import annotations

import collections
import functools

import pytest

from tests.fixtures.partitions import partitions
from tests.fixtures.qlora import qlora, step, token_ids
from train import speed
from train.speed import compiled, frozen

LEAN = speed.SpeedLevers(bf16_storage=True)


@pytest.fixture
def ids():
    return token_ids()


@pytest.fixture(autouse=True)
def fresh_compiler():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def bitsandbytes_ops(run):
    """``run()``'s result, and how many times it called each bitsandbytes op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).startswith("bitsandbytes."):
                self.calls[str(func).removeprefix("bitsandbytes.").removesuffix(".default")] += 1
            return func(*args, **(kwargs or {}))

    with Count() as count:
        result = run()
    return result, count.calls


def test_dequantizing_once_gives_bitsandbytes_loss_and_gradients_exactly(tiny_llama_dir, ids):
    reference = qlora(tiny_llama_dir, levers=LEAN, dropout=0.05)
    once = qlora(tiny_llama_dir, levers=LEAN, dropout=0.05)
    assert frozen.dequantize_once(once) == 14  # q, k, v, o, gate, up, down in each of two layers
    import torch

    torch.manual_seed(3)
    loss, grads = step(reference, ids)
    torch.manual_seed(3)
    loss_once, grads_once = step(once, ids)
    assert float(loss_once) == float(loss)
    assert grads_once.keys() == grads.keys()
    assert all(torch.equal(grads_once[name], grads[name]) for name in grads)


def test_a_checkpointed_step_dequantizes_each_weight_twice_rather_than_three_times(tiny_llama_dir, ids):
    """bitsandbytes dequantizes inside each 4-bit matmul (forward and recompute) and again in its backward pass;
    dequantized in autograd's view, the recompute's weight is the one the backward pass uses."""
    reference = qlora(tiny_llama_dir, levers=LEAN)
    once = qlora(tiny_llama_dir, levers=LEAN)
    frozen.dequantize_once(once)
    _, before = bitsandbytes_ops(lambda: step(reference, ids))
    _, after = bitsandbytes_ops(lambda: step(once, ids))
    weights = 14
    assert before["gemm_4bit"] + before["dequantize_4bit"] > 2 * weights  # forward, recompute, backward
    assert after == {"dequantize_blockwise": 2 * weights, "dequantize_4bit": 2 * weights}  # forward, recompute


def test_the_nf4_kernel_lever_falls_back_to_bitsandbytes_without_a_gpu(tiny_llama_dir, ids):
    """train/speed/nf4.py's kernel needs CUDA and Triton (tests/train/test_nf4.py checks it on a GPU); here the lever
    changes nothing."""
    once = qlora(tiny_llama_dir, levers=LEAN)
    assert frozen.dequantize_once(once, kernel=True) == 14
    _, calls = bitsandbytes_ops(lambda: step(once, ids))
    assert calls == {"dequantize_blockwise": 28, "dequantize_4bit": 28}


@pytest.mark.parametrize(("shape", "options", "handled"), [
    ((1024, 4096), {}, True),  # as load_in_4bit quantizes: NF4, 64-value blocks, double quantization, bytes
    ((1024, 4096), {"quant_storage": "bfloat16"}, False),  # packed for FSDP: not bytes
    ((1024, 4096), {"quant_type": "fp4"}, False),
    ((1024, 4096), {"compress_statistics": False}, False),  # float32 absmax: no nested state
    ((1024, 4096), {"blocksize": 128}, False),
    ((96, 96), {}, False),  # fewer values than one program reads
])
def test_the_nf4_kernel_takes_only_the_format_it_reads(shape, options, handled):
    """train/speed/nf4.py's kernel reads bitsandbytes' default 4-bit format; anything else keeps bitsandbytes' own path."""
    import bitsandbytes.functional as bnbf
    import torch

    from train.speed import nf4

    options = {"blocksize": 64, "compress_statistics": True, "quant_type": "nf4", "quant_storage": "uint8", **options}
    options["quant_storage"] = getattr(torch, options["quant_storage"])
    packed, state = bnbf.quantize_4bit(torch.randn(shape, dtype=torch.bfloat16) * 0.02, **options)
    assert nf4.handles(packed, state) is handled
    assert not nf4.supports(packed, state)  # on the CPU: never


def test_evaluation_keeps_bitsandbytes_own_4bit_matmul(tiny_llama_dir, ids):
    """No gradient: nothing to reuse, and bitsandbytes' own kernels serve short inputs (generation) best."""
    import torch

    reference, once = qlora(tiny_llama_dir, levers=LEAN), qlora(tiny_llama_dir, levers=LEAN)
    frozen.dequantize_once(once)
    logits = {}
    for name, peft_model in (("reference", reference), ("once", once)):
        peft_model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits[name], calls = bitsandbytes_ops(lambda: peft_model(input_ids=ids).logits)
        logits[name, "calls"] = calls
    assert logits["once", "calls"] == logits["reference", "calls"] and not logits["once", "calls"]["dequantize_4bit"]
    assert torch.equal(logits["once"], logits["reference"])


def test_without_checkpointing_the_base_keeps_bitsandbytes_forward(tiny_llama_dir):
    """Without a checkpoint autograd would keep every layer's dequantized weight until the backward pass."""
    import dataclasses

    from bitsandbytes.nn import Linear4bit

    from train import model
    from train.settings import TrainSettings

    for checkpointing in (True, False):
        settings = TrainSettings(base_model=str(tiny_llama_dir), load_in_4bit="true",
                                 gradient_checkpointing=checkpointing)
        plan = dataclasses.replace(model.plan_for(settings, cuda=False),
                                   levers=speed.SpeedLevers(bf16_storage=True, dequantize_once=True))
        peft_model = model.load_for_training(str(tiny_llama_dir), plan, settings)
        patched = {"forward" in vars(layer) for layer in peft_model.modules() if isinstance(layer, Linear4bit)}
        assert patched == {checkpointing}


def compiled_step(folder, ids, *, once: bool, save_attention: bool):
    peft_model = qlora(folder, levers=LEAN)
    if once:
        frozen.dequantize_once(peft_model)
    compiled.compile_model(peft_model, "layers-cudagraphs", save_attention=save_attention)
    with partitions() as graphs:
        loss, grads = step(peft_model, ids)
    (graph,) = graphs  # the layers share one graph
    return loss, grads, graph


def test_in_a_per_layer_graph_the_backward_pass_dequantizes_each_weight_once(tiny_llama_dir, ids):
    _, _, before = compiled_step(tiny_llama_dir, ids, once=False, save_attention=False)
    _, _, after = compiled_step(tiny_llama_dir, ids, once=True, save_attention=False)
    ops_before, ops_after = collections.Counter(before["backward"]), collections.Counter(after["backward"])
    # Before: each weight dequantized for the backward pass, and again inside each recomputed 4-bit matmul.
    assert ops_before["bitsandbytes.dequantize_4bit.default"] == 7 and ops_before["bitsandbytes.gemm_4bit.default"] > 0
    assert ops_after["bitsandbytes.dequantize_4bit.default"] == 7 and ops_after["bitsandbytes.gemm_4bit.default"] == 0
    # The dequantized weights are recomputed, not saved: the forward keeps what it kept before.
    assert [target for target, _ in after["saved"]] == [target for target, _ in before["saved"]]


def test_saving_the_attention_output_takes_the_attention_kernel_out_of_the_recompute(tiny_llama_dir, ids):
    import torch

    loss, grads, plain = compiled_step(tiny_llama_dir, ids, once=True, save_attention=False)
    torch._dynamo.reset()
    loss_saved, grads_saved, saved = compiled_step(tiny_llama_dir, ids, once=True, save_attention=True)
    # The tiny model: batch 2, 4 heads, 24 tokens, head size 16; its output and log-sum-exp are kept.
    assert ("<built-in function getitem>", 2 * 4 * 24 * 16 * 2) in saved["saved"]
    assert len(saved["saved"]) > len(plain["saved"])
    recomputed = [op for op in plain["backward"] if op.startswith("run_with_rng_state")]
    assert recomputed and not [op for op in saved["backward"] if op.startswith("run_with_rng_state")]
    assert float(loss_saved) == float(loss)
    assert all(torch.equal(grads_saved[name], grads[name]) for name in grads)


def test_the_policy_saves_every_attention_kernel_and_defers_the_rest():
    import torch
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        assert compiled.save_attention_outputs(None, getattr(aten, name).default) == CheckpointPolicy.MUST_SAVE
    assert compiled.save_attention_outputs(None, aten.mm.default) == CheckpointPolicy.PREFER_RECOMPUTE
    assert compiled.checkpoint_kwargs("layers-cudagraphs", save_attention=True)["context_fn"].args == (
        compiled.save_attention_outputs,)
    assert "context_fn" not in compiled.checkpoint_kwargs("layers", save_attention=True)  # the checkpoint is outside


def test_the_mlp_policy_saves_the_gate_and_up_matmuls_only():
    import torch
    from torch.utils.checkpoint import CheckpointPolicy

    aten, x = torch.ops.aten, torch.empty(48, 64)
    policy = functools.partial(compiled.save_mlp_outputs, (64, 128), compiled.save_attention_outputs)
    assert policy(None, aten.mm.default, x, torch.empty(64, 128)) == CheckpointPolicy.MUST_SAVE
    # The down projection, the attention's projections and a LoRA adapter's matmuls are left to the rest.
    assert policy(None, aten.mm.default, torch.empty(48, 128), torch.empty(128, 64)) == CheckpointPolicy.PREFER_RECOMPUTE
    assert policy(None, aten.mm.default, x, torch.empty(64, 64)) == CheckpointPolicy.PREFER_RECOMPUTE
    assert policy(None, aten.mm.default, torch.empty(48, 8), torch.empty(8, 128)) == CheckpointPolicy.PREFER_RECOMPUTE
    assert policy(None, aten._scaled_dot_product_flash_attention_for_cpu.default) == CheckpointPolicy.MUST_SAVE
    (chosen,) = compiled.checkpoint_kwargs("layers-cudagraphs", save_attention=True, save_mlp=(64, 128))["context_fn"].args
    assert (chosen.func, chosen.args) == (policy.func, policy.args)


@pytest.mark.parametrize(("tokens", "mib", "layers"), [
    (2048, 896, 8),  # 8B at 2 x 1024: 112 MiB a layer
    (2048, 895, 7),
    (16384, 896, 1),  # a folded micro-batch of 16 rows of 1024
    (16384, 895, 0),
    (64, 896, 32),  # never more than the model's layers
    (2048, 0, 0),
])
def test_the_mlp_budget_keeps_as_many_layers_as_it_holds(tokens, mib, layers):
    assert compiled.mlp_layers_to_save(tokens, 14336, mib, 32) == layers


def keeping_step(folder, ids, saved_mlp_mib: int):
    peft_model = qlora(folder, levers=LEAN)
    frozen.dequantize_once(peft_model)
    compiled.compile_model(peft_model, "layers-cudagraphs", save_attention=True, saved_mlp_mib=saved_mlp_mib)
    with partitions() as graphs:
        loss, grads = step(peft_model, ids)
    return loss, grads, graphs


def test_keeping_the_mlp_outputs_takes_the_gate_and_up_matmuls_out_of_the_recompute(tiny_llama_dir, ids):
    import torch

    loss, grads, (recomputing,) = keeping_step(tiny_llama_dir, ids, saved_mlp_mib=0)
    torch._dynamo.reset()
    loss_kept, grads_kept, (keeping,) = keeping_step(tiny_llama_dir, ids, saved_mlp_mib=1)  # both layers
    # Batch 2 x 24 tokens, intermediate size 128, bf16: the gate's and the up projection's outputs.
    gate_up = 2 * 24 * 128 * 2
    assert [size for _, size in keeping["saved"]].count(gate_up) == [size for _, size in recomputing["saved"]].count(
        gate_up) + 2
    matmuls = collections.Counter(op for op in recomputing["backward"] if op.startswith("aten.mm"))
    matmuls_kept = collections.Counter(op for op in keeping["backward"] if op.startswith("aten.mm"))
    assert sum(matmuls.values()) - sum(matmuls_kept.values()) == 2
    assert float(loss_kept) == float(loss)
    assert all(torch.equal(grads_kept[name], grads[name]) for name in grads)


def test_only_the_last_layers_the_budget_holds_keep_their_mlp_outputs(tiny_llama_dir):
    """1 MiB holds one layer of the tiny model's 2 x 1024 tokens (1 MiB a layer), so the last layer keeps and
    the first recomputes, each through a graph of its own; the step's arithmetic is the same either way."""
    import torch

    ids = torch.randint(3, 200, (2, 1024), generator=torch.Generator().manual_seed(0))
    assert compiled.mlp_layers_to_save(2 * 1024, 128, 1, 2) == 1
    loss, grads, recomputing = keeping_step(tiny_llama_dir, ids, saved_mlp_mib=0)
    torch._dynamo.reset()
    loss_kept, grads_kept, graphs = keeping_step(tiny_llama_dir, ids, saved_mlp_mib=1)
    assert len(recomputing) == 1 and len(graphs) == 2  # compiled in the order the layers first run
    kept = [[size for target, size in graph["saved"] if target == "aten.mm.default"] for graph in graphs]
    assert kept == [[], [2 * 1024 * 128 * 2] * 2]
    assert float(loss_kept) == float(loss)
    assert all(torch.equal(grads_kept[name], grads[name]) for name in grads)
