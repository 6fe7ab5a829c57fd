"""The compile lever (train/speed/compiled.py ``compile_mode``) computes what the eager QLoRA step computes.

Real components on the CPU: a tiny random-init Llama in 4-bit NF4 (bitsandbytes' CPU backend),
peft's LoRA, bf16 autocast, non-reentrant checkpointing, and torch.compile with inductor (the
same compiler the GPU uses; here it emits C++ instead of Triton).
"""

from __future__ import annotations

import pytest

from tests.fixtures.partitions import partitions
from tests.fixtures.qlora import close, qlora, step, token_ids
from train import speed
from train.speed import compiled

LEAN = speed.SpeedLevers(bf16_storage=True)


@pytest.fixture
def ids():
    return token_ids()


@pytest.fixture(autouse=True)
def fresh_compiler():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graph_breaks() -> dict:
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def test_a_compiled_stack_recomputes_its_4bit_matmuls_rather_than_saving_their_outputs(tiny_llama_dir, ids):
    """On CUDA the partitioner saved every 4-bit matmul's output (4.7 GiB on the 8B at 2 x 1024) because
    the checkpoint's recompute tag did not reach them; the selective policy tags them "must recompute"."""
    from torch.utils.checkpoint import CheckpointPolicy

    peft_model = qlora(tiny_llama_dir, levers=LEAN, dropout=0.05)
    compiled.compile_model(peft_model, "stack")
    with partitions() as graphs:
        step(peft_model, ids)
    tags = [tag for graph in graphs for tag in graph["tags"]]
    assert len(tags) == 2 * 7  # q, k, v, o, gate, up, down in each of the tiny model's two layers
    assert set(tags) == {CheckpointPolicy.MUST_RECOMPUTE}
    saved = [target for graph in graphs for target, _ in graph["saved"]]
    assert saved and not [target for target in saved if "bitsandbytes" in target]


def test_the_trainer_leaves_a_compiled_stacks_checkpointing_policy_in_place(tmp_path, tiny_llama_dir,
                                                                          embedded_tokenizer, monkeypatch):
    """The Trainer would turn checkpointing on again from its own arguments, which cannot carry the
    policy (a function; they are written out as JSON), so with a compiled stack it leaves the model's."""
    import dataclasses

    from train import data, model
    from train.run import build_trainer
    from train.settings import TrainSettings

    settings = TrainSettings(base_model=str(tiny_llama_dir), output_dir=tmp_path / "out", max_steps=1, lora_r=4,
                             lora_alpha=8, save_steps=10)
    plan = model.plan_for(settings, cuda=False)
    stacked = dataclasses.replace(plan, levers=speed.SpeedLevers(compile_mode="stack"))
    monkeypatch.setattr(compiled, "compile_model", lambda *args, **kwargs: 0)  # what matters: who sets checkpointing
    peft_model = model.load_for_training(str(tiny_llama_dir), stacked, settings)
    examples = [data.Example([5, 6, 7, 8], [5, 6, 7, 8], "row")] * 2
    trainer = build_trainer(settings, stacked, peft_model, embedded_tokenizer, examples, [], tmp_path / "ckpt", print)
    assert trainer.args.gradient_checkpointing is False
    trainer.train()  # transformers 5.17 re-applies checkpointing here, 5.23 when the Trainer is built
    _, layers = compiled.decoder_stack(peft_model)
    assert all(layer.gradient_checkpointing for layer in layers)
    policies = {layer._gradient_checkpointing_func.keywords.get("context_fn") for layer in layers}
    assert len(policies) == 1 and policies.pop().args == (compiled.recompute_quantized_matmuls,)
    eager = build_trainer(settings, plan, peft_model, embedded_tokenizer, examples, [], tmp_path / "ckpt2", print)
    assert eager.args.gradient_checkpointing is True


def test_an_unknown_compile_mode_is_named_with_the_choices(tiny_llama_dir):
    peft_model = qlora(tiny_llama_dir, levers=LEAN)
    with pytest.raises(ValueError, match="compile_mode='everything'.*layers, stack"):
        compiled.compile_model(peft_model, "everything")


def test_layers_mode_compiles_each_decoder_layer_and_stack_mode_the_stack(tiny_llama_dir):
    layered, stacked = qlora(tiny_llama_dir, levers=LEAN), qlora(tiny_llama_dir, levers=LEAN)
    assert compiled.compile_model(layered, "layers") == layered.config.num_hidden_layers
    stack, layers = compiled.decoder_stack(layered)
    assert all(layer._compiled_call_impl is not None for layer in layers) and stack._compiled_call_impl is None
    compiled.compile_model(stacked, "stack")
    stack, layers = compiled.decoder_stack(stacked)
    assert stack._compiled_call_impl is not None and all(layer._compiled_call_impl is None for layer in layers)


def test_per_layer_compile_checkpoints_each_layer_once_whatever_transformers_does(tiny_llama_dir, ids, monkeypatch):
    """transformers' own checkpoint wrapper moved from around a layer's __call__ (5.17) to inside its
    forward (5.23), i.e. inside the compiled graph; the compiled call checkpoints each layer itself
    instead, around its graph, as measured on the GPU, and transformers' wrapper stays off."""
    import torch.utils.checkpoint

    real = torch.utils.checkpoint.checkpoint
    calls = []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    peft_model = qlora(tiny_llama_dir, levers=LEAN)
    compiled.compile_model(peft_model, "layers")
    _, layers = compiled.decoder_stack(peft_model)
    assert not any(layer.gradient_checkpointing for layer in layers)
    step(peft_model, ids)
    assert len(calls) == len(layers)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# The whole decoder stack as one graph; each decoder layer compiled (the CUDA default before torch 2.13); each
# layer with CUDA graphs, its checkpoint inside the graph (the CUDA default on torch 2.13; on the CPU, graphs are
# skipped).
MODES = ["stack", "layers", "layers-cudagraphs"]


@pytest.fixture
def tiny_on(request, tmp_path):
    """The tiny Llama for ``device``: the session's fixture on the CPU; on the device machine (which has
    no embedded GGUF) one built from the tokenizer folder in LORASHIP_TOKENIZER_DIR."""
    import os

    def folder_for(device: str):
        if device == "cpu":
            return request.getfixturevalue("tiny_llama_dir")
        import torch
        from transformers import AutoTokenizer

        from tests.fixtures.models import build_tiny_llama

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU (run on the device)")
        tokenizer_dir = os.environ.get("LORASHIP_TOKENIZER_DIR") or request.getfixturevalue("embedded_tokenizer_dir")
        return build_tiny_llama(tmp_path / "tiny", AutoTokenizer.from_pretrained(tokenizer_dir))

    return folder_for


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_a_compiled_decoder_gives_the_eager_loss_and_gradients_without_a_graph_break(tiny_on, mode, ids, device):
    folder = tiny_on(device)
    eager = step(qlora(folder, levers=LEAN, device=device), ids, device)
    compiled_model = qlora(folder, levers=LEAN, device=device)
    compiled.compile_model(compiled_model, mode)
    result = step(compiled_model, ids, device)
    assert graph_breaks() == {}  # bitsandbytes' 4-bit matmul and the checkpoints stay inside the graph
    assert abs(float(result[0] - eager[0])) < 1e-3 * float(eager[0])
    # Fused casts round differently in bf16: close, not equal.
    assert result[1].keys() == eager[1].keys() and all(close(result[1][n], eager[1][n], 3e-2) for n in eager[1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_a_compiled_decoder_gives_the_eager_gradients_on_a_packed_row(tiny_on, mode, device):
    """What training feeds it: rows of different lengths packed into one (packing.collate_packed)."""
    import torch

    from train.speed.packing import collate_packed

    folder = tiny_on(device)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 200, (length,), generator=generator).tolist() for length in (9, 17, 6)]
    batch = {k: v.to(device) for k, v in collate_packed([{"input_ids": r, "labels": r} for r in rows]).items()}

    def packed_step(peft_model):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = peft_model(**batch, use_cache=False).loss
        loss.backward()
        return loss.detach().float().cpu(), {n: p.grad.float().cpu() for n, p in peft_model.named_parameters()
                                             if p.requires_grad}

    eager = packed_step(qlora(folder, levers=LEAN, device=device))
    compiled_model = qlora(folder, levers=LEAN, device=device)
    compiled.compile_model(compiled_model, mode)
    result = packed_step(compiled_model)
    assert abs(float(result[0] - eager[0])) < 1e-3 * float(eager[0])
    assert result[1].keys() == eager[1].keys() and all(close(result[1][n], eager[1][n], 3e-2) for n in eager[1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_a_recomputed_compiled_decoder_draws_the_dropout_mask_of_its_forward_every_step(tiny_on, mode, ids, device):
    """Checkpointing recomputes the forward in the backward pass; with LoRA dropout on, the recomputed
    pass must drop the same inputs, or the gradients belong to a forward that never happened; and each
    step must draw a new mask, not replay the first (CUDA's compiled RNG keeps its own state)."""
    import torch

    folder = tiny_on(device)

    def grads_per_step(*, checkpointing: bool):
        torch._dynamo.reset()
        peft_model = qlora(folder, levers=LEAN, dropout=0.3, checkpointing=checkpointing, device=device)
        compiled.compile_model(peft_model, mode)
        torch.manual_seed(0)
        grads = []
        for _ in range(3):  # the same rows and weights each time: only the dropout mask changes
            for param in peft_model.parameters():
                param.grad = None
            grads.append(step(peft_model, ids, device)[1])
        return grads

    recomputed, kept = grads_per_step(checkpointing=True), grads_per_step(checkpointing=False)
    for recomputed_step, kept_step in zip(recomputed, kept):
        assert all(close(recomputed_step[n], kept_step[n], 3e-2) for n in kept_step)
    for earlier, later in zip(kept, kept[1:]):  # a new mask moves the gradients far more than rounding does
        assert not all(close(later[n], earlier[n], 0.2) for n in earlier)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_a_compiled_decoder_keeps_packed_examples_apart(tiny_on, mode, device):
    """Packing puts several examples in one row whose position ids restart at each; the compiled stack
    must build the same block-diagonal mask eager does, so the second example's logits are what it
    gets alone (a causal mask over the whole row moves them by ~0.6 on the tiny model)."""
    import torch

    folder = tiny_on(device)
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randint(3, 200, (2, 6), generator=generator)
    packed = torch.cat([first, second])[None].to(device)
    positions = torch.tensor([list(range(6)) * 2], device=device)
    alone_model = qlora(folder, levers=LEAN, device=device)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        alone = alone_model(input_ids=second[None].to(device), use_cache=False).logits.float()
    packed_model = qlora(folder, levers=LEAN, device=device)
    compiled.compile_model(packed_model, mode)
    with torch.autocast(device, dtype=torch.bfloat16):
        logits = packed_model(input_ids=packed, position_ids=positions, labels=packed).logits.float()
    assert float((logits[0, 6:] - alone[0]).abs().max()) < 0.05 * float(alone.abs().max())


def graphs_after_each_packed_step(peft_model) -> list[int]:
    """Train steps on packed rows of four different lengths; how many graphs were compiled after each."""
    import torch
    from torch._dynamo.utils import counters

    from train.speed.packing import collate_packed

    generator = torch.Generator().manual_seed(0)
    graphs = []
    for lengths in ((9, 17, 6), (30, 4), (11,), (7, 3, 12)):
        rows = [torch.randint(3, 200, (length,), generator=generator).tolist() for length in lengths]
        batch = collate_packed([{"input_ids": r, "labels": r} for r in rows])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            peft_model(**batch, use_cache=False).loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    return graphs


def test_a_compiled_stack_compiles_twice_for_packed_rows_of_any_length(tiny_llama_dir):
    """Packed rows change length every step: the first length compiles, the second compiles a graph with
    the length symbolic, and no later length compiles again."""
    peft_model = qlora(tiny_llama_dir, levers=LEAN)
    compiled.compile_model(peft_model, "stack")
    graphs = graphs_after_each_packed_step(peft_model)
    assert graphs == [1, 2, 2, 2]


@pytest.mark.skipif(not compiled.symbolic_lengths_in_graph(), reason="this torch takes static shapes for per-layer graphs")
def test_per_layer_cuda_graphs_take_the_packed_length_symbolic_from_the_second_length(tiny_llama_dir):
    """Each layer's graph, its checkpoint inside: the first length compiles, the second compiles with the length
    symbolic, a lone row (not packed: a plain causal batch, no mask) compiles its own, and then no length
    compiles again: on a GPU a new length only records its CUDA graphs. (torch 2.11 takes static shapes here, and
    every bucketed length compiled.)"""
    peft_model = qlora(tiny_llama_dir, levers=LEAN)
    compiled.compile_model(peft_model, "layers-cudagraphs")  # on the CPU: compiled, no graphs to record
    graphs = graphs_after_each_packed_step(peft_model)
    assert graphs == [1, 2, 3, 3]


@pytest.mark.parametrize("mode", ["stack", "layers"])
def test_a_compiled_model_evaluates_eagerly_without_a_second_compile(tiny_llama_dir, ids, mode):
    """Evaluation (eval mode, no gradients) would compile the stack, or the layers, again for a few batches."""
    import torch
    from torch._dynamo.utils import counters

    eager = qlora(tiny_llama_dir, levers=LEAN)
    trained = qlora(tiny_llama_dir, levers=LEAN)
    compiled.compile_model(trained, mode)
    step(trained, ids)
    assert counters["stats"]["unique_graphs"] == 1
    for peft_model in (eager, trained):
        peft_model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        evaluated, expected = trained(input_ids=ids, labels=ids).loss, eager(input_ids=ids, labels=ids).loss
    assert counters["stats"]["unique_graphs"] == 1
    assert float(evaluated) == float(expected)  # the same eager code on the same weights


@pytest.mark.gpu
def test_on_cuda_a_compiled_stack_saves_no_4bit_matmul_output(tiny_on, ids):
    """The bug itself: with bitsandbytes' CUDA kernels the untagged 4-bit matmuls were saved (run on the device)."""
    peft_model = qlora(tiny_on("cuda"), levers=LEAN, dropout=0.05, device="cuda")
    compiled.compile_model(peft_model, "stack")
    with partitions() as graphs:
        step(peft_model, ids, "cuda")
    saved = [target for graph in graphs for target, _ in graph["saved"]]
    assert saved and not [target for target in saved if "bitsandbytes" in target]


def test_a_compiler_failure_in_a_training_step_names_the_setting_that_avoids_it(tiny_llama_dir, ids, monkeypatch):
    """An inductor bug on some model or GPU must not end a run in a compiler traceback."""
    import torch

    from train.settings import TrainError

    def failing_backend(graph, example_inputs):
        raise RuntimeError("Node add_797 was invalid, but is output")

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real(fn, backend=failing_backend))
    peft_model = qlora(tiny_llama_dir, levers=LEAN)
    compiled.compile_model(peft_model, "layers")
    with pytest.raises(TrainError, match=r"torch.compile failed on the decoder \(BackendCompilerFailed: "
                                         r"RuntimeError: Node add_797 was invalid.*set TORCH_COMPILE=off"):
        step(peft_model, ids)


def test_training_with_per_layer_compile_checkpoints_each_layer_once_per_step(tmp_path, tiny_llama_dir,
                                                                          embedded_tokenizer, monkeypatch):
    """Through the Trainer, as ``python -m train`` runs it: the Trainer does not turn transformers'
    own checkpointing on again over the compiled layers, so each layer is checkpointed once a step."""
    import dataclasses

    import torch.utils.checkpoint

    from train import data, model
    from train.run import build_trainer
    from train.settings import TrainSettings

    settings = TrainSettings(base_model=str(tiny_llama_dir), output_dir=tmp_path / "out", max_steps=2, lora_r=4,
                             lora_alpha=8, save_steps=10, load_in_4bit="true")
    plan = model.plan_for(settings, cuda=False)
    layered = dataclasses.replace(plan, levers=speed.SpeedLevers(bf16_storage=True, compile_mode="layers"))
    real = torch.utils.checkpoint.checkpoint
    calls = []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    peft_model = model.load_for_training(str(tiny_llama_dir), layered, settings)  # compiles each layer
    examples = [data.Example([5, 6, 7, 8, 9], [5, 6, 7, 8, 9], "row")] * 4
    trainer = build_trainer(settings, layered, peft_model, embedded_tokenizer, examples, [], tmp_path / "ckpt", print)
    stack, layers = compiled.decoder_stack(peft_model)
    forwards = []
    stack.register_forward_pre_hook(lambda module, args: forwards.append(module.training))
    trainer.train()
    assert not any(layer.gradient_checkpointing for layer in layers)
    assert forwards and all(forwards)
    assert len(calls) == len(forwards) * len(layers)


@pytest.mark.skipif(not compiled.symbolic_lengths_in_graph(), reason="this torch takes static shapes for per-layer graphs")
def test_the_default_per_layer_graphs_train_through_the_trainer_to_the_per_layer_compiles_losses(
        tmp_path, tiny_llama_dir, embedded_tokenizer):
    """``python -m train``'s CUDA plan on torch 2.13, through the Trainer: packed rows bucketed (a filler segment
    with no labels), each layer's graph with its checkpoint inside; the same loss and gradient norm at every
    step as per-layer compile on the unbucketed rows. So too the whole plan, with its recompute levers and the
    LM head's label positions. (On the CPU no CUDA graph is recorded; the compiled graphs are the same.)"""
    import dataclasses

    from transformers import set_seed

    from train import data, model
    from train.run import build_trainer
    from train.settings import TrainSettings

    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19], [20, 21], [22, 23, 24, 25], [26, 27, 28],
            [29, 30, 31, 32, 33, 34], [35, 36]]
    examples = [data.Example(ids, list(ids), f"row {i}") for i, ids in enumerate(rows)]
    logged = {}
    planned = speed.choose_levers(cuda=True, no_graphs=None)[0]
    assert planned.dequantize_once and planned.save_attention and planned.label_positions
    for mode in ("layers", "layers-cudagraphs", "plan"):
        settings = TrainSettings(base_model=str(tiny_llama_dir), output_dir=tmp_path / mode, max_steps=4, lora_r=4,
                                 lora_alpha=8, lora_dropout=0.0, batch_size=2, grad_accum=1, max_seq_length=64,
                                 logging_steps=1, save_steps=10, load_in_4bit="true", seed=0)
        plan = model.plan_for(settings, cuda=False)
        levers = planned if mode == "plan" else speed.SpeedLevers(bf16_storage=True, compile_mode=mode, packing=True)
        plan = dataclasses.replace(plan, levers=levers)
        set_seed(settings.seed)  # as python -m train does: the same adapter init in every run
        peft_model = model.load_for_training(str(tiny_llama_dir), plan, settings)
        trainer = build_trainer(settings, plan, peft_model, embedded_tokenizer, examples, [], tmp_path / f"ckpt-{mode}",
                                print)
        assert speed.replays_graphs(plan.levers) == (mode != "layers")
        trainer.train()
        logged[mode] = [(entry["loss"], entry["grad_norm"]) for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged["layers"]) == 4
    assert logged["layers-cudagraphs"] == [pytest.approx(pair, rel=1e-4) for pair in logged["layers"]]
    assert logged["plan"] == [pytest.approx(pair, rel=1e-4) for pair in logged["layers"]]
