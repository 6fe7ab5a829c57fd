"""The speed levers are what ``python -m train`` does on CUDA, and nothing changes on a CPU.

Plan-level (no GPU needed): which levers a machine gets and what is said about the rest, how
the micro-batches are folded, that the lean k-bit preparation keeps the frozen weights' dtype,
and that the trainer gets the packing collator. The GPU numbers are in docs/benchmarks.md
("Training speed (GPU)", from bench/train_throughput.py).
"""

from __future__ import annotations

import pytest

from train import data, model, speed
from train.settings import TrainSettings
from train.speed import compiled, frozen, packing


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA machine where torch.compile can run, with CUDA graphs that take a symbolic length (torch 2.13, the
    train image's), and liger-kernel installed (plan_for only asks)."""
    monkeypatch.setattr(speed, "compile_supported", lambda: True)
    monkeypatch.setattr(compiled, "symbolic_lengths_in_graph", lambda: True)
    monkeypatch.setattr(speed, "liger_installed", lambda: True)
    return monkeypatch


def test_cuda_defaults_compile_each_decoder_layer_with_cuda_graphs_instead_of_liger(gpu):
    # The measured default (docs/benchmarks.md): liger's kernels do not trace inside a graph.
    plan = model.plan_for(TrainSettings(), cuda=True)
    assert plan.levers == speed.SpeedLevers(bf16_storage=True, compile_mode="layers-cudagraphs", packing=True,
                                            fold_accumulation=True, dequantize_once=True, save_attention=True,
                                            label_positions=True, saved_mlp_mib=1344, nf4_kernel=True,
                                            host_embedding=True)
    assert speed.replays_graphs(plan.levers)  # so packed rows are bucketed to a few lengths
    said = [notice for notice in plan.notices if notice.startswith("speed:")]
    assert len(said) == 1 and "CUDA graphs on each decoder layer" in said[0]
    assert "TORCH_COMPILE=layers" in said[0] and "off" in said[0]


def test_cuda_defaults_compile_each_layer_without_graphs_where_torch_cannot_take_a_symbolic_length(gpu):
    # torch 2.11 compiles every new packed length again inside a checkpointed graph.
    gpu.setattr(compiled, "symbolic_lengths_in_graph", lambda: False)
    plan = model.plan_for(TrainSettings(), cuda=True)
    assert plan.levers == speed.SpeedLevers(bf16_storage=True, compile_mode="layers", packing=True,
                                            fold_accumulation=True)
    assert not speed.replays_graphs(plan.levers)
    said = [notice for notice in plan.notices if notice.startswith("speed:")]
    assert len(said) == 1 and "torch.compile on each decoder layer" in said[0] and "need torch 2.11" in said[0]



def test_cuda_defaults_plan_no_graphs_where_a_step_accumulates_over_several_micro_batches(gpu):
    # Measured only with the optimizer step folded into one micro-batch (at most 16384 tokens).
    settings = TrainSettings(batch_size=4, grad_accum=4, max_seq_length=2048)
    plan = model.plan_for(settings, cuda=True)
    assert plan.levers.compile_mode == "layers"
    said = [notice for notice in plan.notices if notice.startswith("speed:")]
    assert len(said) == 1 and "several micro-batches" in said[0] and "32768 tokens, over 16384" in said[0]
    assert model.plan_for(TrainSettings(batch_size=2, grad_accum=8, max_seq_length=1024),  # 16384: folds
                          cuda=True).levers.compile_mode == "layers-cudagraphs"


def test_cuda_defaults_plan_no_graphs_for_several_processes(gpu):
    plan = model.plan_for(TrainSettings(), cuda=True, processes=2)
    assert plan.levers.compile_mode == "layers"
    assert any("not planned for 2 processes" in notice for notice in plan.notices)


def test_asking_for_layer_graphs_where_they_are_unmeasured_gets_them_and_says_so(gpu):
    plan = model.plan_for(TrainSettings(torch_compile="layers-cudagraphs", batch_size=4, grad_accum=4,
                                        max_seq_length=2048), cuda=True)
    assert plan.levers.compile_mode == "layers-cudagraphs"
    said = [notice for notice in plan.notices if notice.startswith("speed:")]
    assert len(said) == 1 and "measured only on one GPU with each optimizer step in one micro-batch" in said[0]

def test_saved_mlp_mib_sets_what_the_layer_graphs_keep(gpu):
    # 3584 MiB keeps every layer of an 8B at 2x1024; 0 none.
    gpu.setenv("SAVED_MLP_MIB", "3584")
    assert model.plan_for(TrainSettings(), cuda=True).levers.saved_mlp_mib == 3584
    gpu.setenv("SAVED_MLP_MIB", "0")
    plan = model.plan_for(TrainSettings(), cuda=True)
    assert plan.levers.saved_mlp_mib == 0 and plan.levers.compile_mode == "layers-cudagraphs"
    assert not any("SAVED_MLP_MIB" in notice for notice in plan.notices)


def test_saved_mlp_mib_zero_leaves_the_token_embedding_on_the_gpu(gpu):
    # The table moves to host memory only to give its GPU memory to the kept MLP outputs (train/speed/host_embedding.py).
    gpu.setenv("SAVED_MLP_MIB", "0")
    assert not model.plan_for(TrainSettings(), cuda=True).levers.host_embedding
    gpu.setenv("SAVED_MLP_MIB", "1")
    assert model.plan_for(TrainSettings(), cuda=True).levers.host_embedding


def test_the_token_embedding_stays_on_the_gpu_without_layer_graphs(gpu):
    # Measured only with per-layer CUDA graphs, where the MLP outputs it pays for are kept.
    assert not model.plan_for(TrainSettings(torch_compile="layers"), cuda=True).levers.host_embedding
    assert not model.plan_for(TrainSettings(torch_compile="off"), cuda=True).levers.host_embedding


def test_saved_mlp_mib_without_layer_graphs_is_unused_and_says_so(gpu):
    gpu.setenv("SAVED_MLP_MIB", "2048")
    plan = model.plan_for(TrainSettings(torch_compile="layers"), cuda=True)
    assert plan.levers.saved_mlp_mib == 0
    assert [notice for notice in plan.notices if "SAVED_MLP_MIB=2048: unused" in notice]
    gpu.delenv("SAVED_MLP_MIB")
    assert not any("SAVED_MLP_MIB" in notice for notice in model.plan_for(TrainSettings(torch_compile="layers"),
                                                                          cuda=True).notices)


def test_saved_mlp_mib_must_not_be_negative(gpu):
    from loraship.envsettings import SettingsError, load_settings

    gpu.setenv("SAVED_MLP_MIB", "-1")
    with pytest.raises(SettingsError) as err:
        load_settings(TrainSettings)
    assert any(line.startswith("SAVED_MLP_MIB='-1'") for line in err.value.problems)


def test_torch_compile_layers_compiles_each_layer_without_graphs(gpu):
    plan = model.plan_for(TrainSettings(torch_compile="layers"), cuda=True)
    assert plan.levers.compile_mode == "layers" and plan.levers.liger_kernels == ()
    said = [notice for notice in plan.notices if notice.startswith("speed:")]
    assert len(said) == 1 and "torch 2.13" not in said[0]


def test_asking_for_layer_graphs_on_an_older_torch_says_each_length_compiles_again(gpu):
    gpu.setattr(compiled, "symbolic_lengths_in_graph", lambda: False)
    plan = model.plan_for(TrainSettings(torch_compile="layers-cudagraphs"), cuda=True)
    assert plan.levers.compile_mode == "layers-cudagraphs"
    said = [notice for notice in plan.notices if notice.startswith("speed:")]
    assert len(said) == 1 and "every new packed length compiles again" in said[0]


def test_torch_compile_off_selects_the_eager_levers_with_liger(gpu):
    plan = model.plan_for(TrainSettings(torch_compile="off"), cuda=True)
    assert plan.levers == speed.SpeedLevers(
        bf16_storage=True, liger_kernels=("rms_norm", "swiglu", "rope"), packing=True, fold_accumulation=True,
    )
    assert not any(notice.startswith("speed:") for notice in plan.notices)


def test_eager_without_liger_keeps_the_other_levers_and_says_so(gpu):
    gpu.setattr(speed, "liger_installed", lambda: False)
    plan = model.plan_for(TrainSettings(torch_compile="off"), cuda=True)
    assert plan.levers == speed.SpeedLevers(bf16_storage=True, liger_kernels=(), packing=True, fold_accumulation=True)
    said = [notice for notice in plan.notices if notice.startswith("speed:")]
    assert len(said) == 1 and "liger-kernel not installed" in said[0]


def test_a_gpu_that_cannot_compile_runs_eagerly_and_says_why(gpu):
    gpu.setattr(speed, "compile_supported", lambda: False)
    plan = model.plan_for(TrainSettings(), cuda=True)
    assert plan.levers.compile_mode == "" and plan.levers.liger_kernels == speed.LIGER_KERNELS
    said = [notice for notice in plan.notices if notice.startswith("speed:")]
    assert len(said) == 1 and "needs Triton and a GPU of compute capability 7.0+" in said[0]


def test_asking_for_compile_where_it_cannot_run_is_an_error_that_says_what_to_set(gpu):
    gpu.setattr(speed, "compile_supported", lambda: False)
    with pytest.raises(model.TrainError, match="TORCH_COMPILE=stack: torch.compile cannot run here.*TORCH_COMPILE=off"):
        model.plan_for(TrainSettings(torch_compile="stack"), cuda=True)


def test_cpu_falls_back_to_the_plain_path_with_one_notice():
    plan = model.plan_for(TrainSettings(), cuda=False)
    assert plan.levers == speed.SpeedLevers()
    assert [notice for notice in plan.notices if notice.startswith("speed:")] == [
        "speed: fused GPU kernels and padding-free packing are CUDA-only; off on CPU"
    ]


def test_torch_compile_stack_compiles_the_whole_decoder_stack_instead_of_liger(gpu):
    plan = model.plan_for(TrainSettings(torch_compile="stack"), cuda=True)
    assert plan.levers == speed.SpeedLevers(bf16_storage=True, compile_mode="stack", packing=True,
                                            fold_accumulation=True)
    said = [notice for notice in plan.notices if notice.startswith("speed:")]
    assert len(said) == 1 and "TORCH_COMPILE=stack" in said[0] and "liger-kernel off" in said[0]


def test_an_asked_compile_is_off_on_a_cpu_and_says_so():
    plan = model.plan_for(TrainSettings(torch_compile="layers"), cuda=False)
    assert plan.levers == speed.SpeedLevers()
    assert "TORCH_COMPILE=layers: torch.compile of the decoder is CUDA-only; off on CPU" in plan.notices


@pytest.mark.parametrize(("value", "expected"), [
    ("auto", "auto"), ("layers", "layers"), ("Layers-CUDAGraphs", "layers-cudagraphs"), ("Stack", "stack"),
    ("off", "off"), ("true", "auto"), ("1", "auto"), ("false", "off"), ("no", "off"), ("", "auto"),
])
def test_torch_compile_reads_its_choices_and_yes_no_spellings(monkeypatch, value, expected):
    monkeypatch.setenv("TORCH_COMPILE", value)
    assert TrainSettings().torch_compile == expected


def test_torch_compile_names_its_choices_when_wrong(monkeypatch):
    from loraship.envsettings import SettingsError, load_settings

    monkeypatch.setenv("TORCH_COMPILE", "everything")
    with pytest.raises(SettingsError, match="TORCH_COMPILE"):
        load_settings(TrainSettings)


def test_frozen_weights_stay_bf16_with_a_float32_residual_stream_by_default(gpu):
    for load_in_4bit in ("true", "false"):
        levers = model.plan_for(TrainSettings(load_in_4bit=load_in_4bit), cuda=True).levers
        assert levers.bf16_storage is True


@pytest.mark.parametrize(
    ("batch", "accum", "max_len", "levers", "expected"),
    [
        (2, 4, 1024, speed.SpeedLevers(packing=True, fold_accumulation=True), (8, 1)),  # the defaults, folded
        (2, 4, 4096, speed.SpeedLevers(packing=True, fold_accumulation=True), (2, 4)),  # 32k tokens: over budget
        (16, 1, 1024, speed.SpeedLevers(packing=True, fold_accumulation=True), (16, 1)),
        (2, 4, 1024, speed.SpeedLevers(packing=False, fold_accumulation=True), (2, 4)),  # padded rows: never
        (2, 4, 1024, speed.SpeedLevers(), (2, 4)),  # CPU
    ],
)
def test_micro_batching_folds_a_step_into_one_packed_batch_within_the_budget(batch, accum, max_len, levers, expected):
    assert packing.micro_batching(batch, accum, max_len, levers) == expected


def test_lean_kbit_preparation_freezes_without_upcasting(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    prepared = frozen.prepare_frozen_base(base, gradient_checkpointing=True)
    assert {p.dtype for p in prepared.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in prepared.parameters())
    assert prepared.is_gradient_checkpointing
    assert prepared.get_input_embeddings()(torch.tensor([[1, 2]])).dtype == torch.float32  # the residual stream


def test_liger_is_not_applied_to_an_uncovered_family():
    class Gpt2Like:
        class config:
            model_type = "gpt2"

    assert "not applied to model type 'gpt2'" in frozen.apply_liger_kernels(Gpt2Like())


def test_the_trainer_packs_and_folds_when_the_plan_says_so(tmp_path, tiny_llama_dir, embedded_tokenizer):
    import dataclasses

    from train.run import build_trainer

    settings = TrainSettings(
        base_model=str(tiny_llama_dir), output_dir=tmp_path / "out", batch_size=2, grad_accum=3, max_seq_length=64,
        max_steps=1, lora_r=4, lora_alpha=8,
    )
    plan = dataclasses.replace(model.plan_for(settings, cuda=False), levers=speed.SpeedLevers(packing=True, fold_accumulation=True))
    rows = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15], [16, 17, 18], [19, 20]]
    examples = [data.Example(ids, list(ids), f"row {i}") for i, ids in enumerate(rows)]
    peft_model = model.load_for_training(str(tiny_llama_dir), plan, settings)
    trainer = build_trainer(settings, plan, peft_model, embedded_tokenizer, examples, [], tmp_path / "ckpt", print)
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (6, 1)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (1, 16)
    assert sorted(map(tuple, _rows_of(batch))) == sorted(map(tuple, rows))



def test_the_trainer_buckets_packed_rows_when_the_default_plan_replays_cuda_graphs(tmp_path, tiny_llama_dir,
                                                                                   embedded_tokenizer):
    # A CUDA graph replays one shape: packed rows come padded to a few lengths (packing.bucket_length), the
    # padding a filler segment with no labels.
    import dataclasses

    from train.run import build_trainer

    settings = TrainSettings(
        base_model=str(tiny_llama_dir), output_dir=tmp_path / "out", batch_size=2, grad_accum=3, max_seq_length=64,
        max_steps=1, lora_r=4, lora_alpha=8,
    )
    levers, _ = speed.choose_levers(cuda=True, no_graphs=None)
    plan = dataclasses.replace(model.plan_for(settings, cuda=False), levers=levers)
    rows = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15], [16, 17, 18], [19, 20]]
    examples = [data.Example(ids, list(ids), f"row {i}") for i, ids in enumerate(rows)]
    peft_model = model.load_for_training(str(tiny_llama_dir), plan, settings)
    trainer = build_trainer(settings, plan, peft_model, embedded_tokenizer, examples, [], tmp_path / "ckpt", print)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape == (1, packing.bucket_length(16)) == (1, 64)
    assert sorted(map(tuple, _rows_of(batch)[:-1])) == sorted(map(tuple, rows))  # then the filler
    assert (batch["labels"][0, 16:] == -100).all()

def _rows_of(batch):
    """Split a packed row back into its rows at each position id 0."""
    ids, positions = batch["input_ids"][0].tolist(), batch["position_ids"][0].tolist()
    rows = []
    for token, position in zip(ids, positions):
        if position == 0:
            rows.append([])
        rows[-1].append(token)
    return rows


def test_a_compile_failure_with_cuda_graphs_names_the_settings_that_avoid_them():
    err = compiled.compile_failed(RuntimeError("backend='inductor' raised:\nAssertionError: Node add_7 was invalid"),
                               graphs=True)
    assert isinstance(err, model.TrainError)
    assert "AssertionError: Node add_7 was invalid" in str(err)
    assert "TORCH_COMPILE=layers to compile without CUDA graphs" in str(err) and "TORCH_COMPILE=off" in str(err)


def test_the_warnings_that_bucketed_per_layer_graphs_give_by_design_are_quiet(monkeypatch):
    import warnings

    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.triton, "cudagraph_dynamic_shape_warn_limit", 8)  # restored after the test
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled.quiet_expected_graph_warnings()
        warnings.warn("Unable to hit fast path of CUDAGraphs because outputs from a previous step still require "
                      "backward.")
        warnings.warn("something else")
    assert [str(w.message) for w in caught] == ["something else"]
    assert inductor.triton.cudagraph_dynamic_shape_warn_limit is None


def test_python_m_train_plans_for_the_processes_it_was_launched_with(gpu, tiny_llama_dir, monkeypatch):
    """torchrun sets WORLD_SIZE; ``train.run`` hands it to the plan, which plans no CUDA graphs for DDP."""
    from pathlib import Path

    from train import run

    monkeypatch.setattr(run, "cuda_available", lambda: True)
    data_file = Path(__file__).resolve().parents[2] / "data" / "quokka" / "train.jsonl"
    said = {}
    for processes in ("1", "2"):
        monkeypatch.setenv("WORLD_SIZE", processes)
        settings = TrainSettings(_env_file=None, base_model=str(tiny_llama_dir), dataset=str(data_file))
        lines = []
        run.train(settings, dry_run=True, echo=lines.append)
        said[processes] = [line for line in lines if line.startswith("note: speed:")]
    assert len(said["1"]) == 1 and "CUDA graphs on each decoder layer" in said["1"][0]
    assert len(said["2"]) == 1 and "not planned for 2 processes" in said["2"][0]
