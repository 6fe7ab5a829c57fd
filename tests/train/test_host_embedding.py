"""The token embedding kept in pinned host memory (train/speed/host_embedding.py, the ``host_embedding`` lever).

The CPU tests pin the wiring on a tiny untied Llama (which tables may move, that a moved table gives the same
loss and adapter gradients, and what it adds to the MLP budget); the GPU tests (run on the device) pin the
Triton kernel that reads the rows from host memory, bit for bit against an ordinary GPU lookup.
"""

from __future__ import annotations

import pytest

from train import model, speed
from train.speed import host_embedding
from train.settings import TrainSettings


def tiny_untied_llama(tie: bool = False, device: str = "cpu"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).to(device)


def with_lora(base):
    import torch
    from peft import get_peft_model

    settings = TrainSettings(lora_r=4, lora_alpha=8, lora_dropout=0.0, seed=0)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, model.lora_config(settings, base))
    generator = torch.Generator().manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # non-zero, so the adapter's gradients flow through the whole stack
            param.data = (torch.randn(param.shape, generator=generator) * 0.05).to(param.device)
    return peft_model


def loss_and_grads(peft_model, ids):
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.fixture
def ids():
    import torch

    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def test_an_untied_embedding_may_move_to_host_memory():
    assert host_embedding.movable(tiny_untied_llama()) is None


def test_a_tied_embedding_stays_because_the_lm_head_reads_all_of_it():
    why_not = host_embedding.movable(tiny_untied_llama(tie=True))
    assert why_not is not None and "tied to the LM head" in why_not


def test_a_moved_embedding_gives_the_same_loss_and_adapter_gradients(ids):
    import torch

    reference, moved = tiny_untied_llama(), tiny_untied_llama()
    table = moved.get_input_embeddings().weight.detach().clone()
    host_embedding.move_to_host(moved)
    assert torch.equal(moved.get_input_embeddings().weight, table)
    loss, grads = loss_and_grads(with_lora(reference), ids)
    loss_moved, grads_moved = loss_and_grads(with_lora(moved), ids)
    assert torch.equal(loss_moved, loss)
    assert grads_moved.keys() == grads.keys()
    assert all(torch.equal(grads_moved[name], grads[name]) for name in grads)


def test_a_moved_embedding_is_neither_a_parameter_nor_in_the_state_dict():
    moved = tiny_untied_llama()
    parameters = sum(p.numel() for p in moved.parameters())
    host_embedding.move_to_host(moved)
    assert sum(p.numel() for p in moved.parameters()) == parameters - 256 * 64
    assert not any("embed_tokens" in key for key in moved.state_dict())
    assert moved.device.type == "cpu"  # the first remaining parameter's device, where inputs go
    assert "in pinned host memory" in repr(moved.get_input_embeddings())


def test_without_a_gpu_the_embedding_stays_and_the_run_says_why():
    said = []
    base = tiny_untied_llama()
    before = base.get_input_embeddings()
    assert speed.keep_embedding_in_host_memory(base, said.append) == 0
    assert base.get_input_embeddings() is before
    assert said == ["note: speed: the token embedding stays in GPU memory: it needs Triton and a CUDA GPU"]


def test_where_host_memory_cannot_be_pinned_the_embedding_stays_and_the_run_says_why(monkeypatch):
    # A host short of page-locked memory trains with the table on the GPU instead.
    def refuse(model):
        raise RuntimeError("CUDA error: out of memory\nmore")

    monkeypatch.setattr(host_embedding, "available", lambda: True)
    monkeypatch.setattr(host_embedding, "move_to_host", refuse)
    said = []
    base = tiny_untied_llama()
    before = base.get_input_embeddings()
    assert speed.keep_embedding_in_host_memory(base, said.append) == 0
    assert base.get_input_embeddings() is before
    assert said == ["note: speed: the token embedding stays in GPU memory: pinning it in host memory failed "
                    "(CUDA error: out of memory)"]


def test_the_mlp_budget_grows_by_the_gpu_memory_the_embedding_left(monkeypatch):
    base = tiny_untied_llama()
    monkeypatch.setattr(host_embedding, "held_bytes", lambda model: 1002 * 2**20)
    assert speed.mlp_budget_mib(base, speed.SpeedLevers(saved_mlp_mib=1024)) == 2026
    assert speed.mlp_budget_mib(base, speed.SpeedLevers(saved_mlp_mib=0)) == 0  # SAVED_MLP_MIB=0 keeps none


def test_a_cpu_table_is_not_counted_as_gpu_memory_freed():
    base = tiny_untied_llama()
    assert host_embedding.move_to_host(base) == 0
    assert host_embedding.held_bytes(base) == 0  # not pinned: no GPU took it


@pytest.mark.gpu
def test_the_kernel_reads_the_rows_of_an_ordinary_gpu_lookup_bit_for_bit():
    import torch

    table = torch.randn(128256, 4096, dtype=torch.bfloat16).pin_memory()
    ids = torch.randint(0, 128256, (2, 1024), device="cuda")
    on_gpu = table.cuda()
    assert torch.equal(host_embedding.gather_rows(table, ids), on_gpu[ids])
    assert torch.equal(host_embedding.gather_rows(table, ids, values=4096), on_gpu[ids])  # a whole row a program
    odd = torch.randn(300, 100, dtype=torch.float32).pin_memory()  # a width that is not a whole program
    few = torch.tensor([[0, 299, 7]], device="cuda")
    assert torch.equal(host_embedding.gather_rows(odd, few), odd.cuda()[few])
    assert torch.equal(host_embedding.gather_rows(odd, few, values=64), odd.cuda()[few])  # two programs a row


@pytest.mark.gpu
def test_an_id_outside_the_table_reads_nothing_and_gives_zeros():
    import torch

    table = torch.ones(10, 64, dtype=torch.bfloat16).pin_memory()
    rows = host_embedding.gather_rows(table, torch.tensor([3, 10, -1, 2**40], device="cuda"))
    assert rows[0].eq(1).all() and rows[1:].eq(0).all()


@pytest.mark.gpu
def test_on_a_gpu_the_moved_embedding_frees_its_memory_and_trains_the_same(ids):
    import torch

    ids = ids.cuda()
    reference, moved = tiny_untied_llama(device="cuda"), tiny_untied_llama(device="cuda")
    before = torch.cuda.memory_allocated()
    assert host_embedding.move_to_host(moved) == 256 * 64 * 4
    assert torch.cuda.memory_allocated() == before - 256 * 64 * 4
    assert host_embedding.held_bytes(moved) == 256 * 64 * 4
    loss, grads = loss_and_grads(with_lora(reference), ids)
    loss_moved, grads_moved = loss_and_grads(with_lora(moved), ids)
    assert torch.equal(loss_moved, loss)
    assert all(torch.equal(grads_moved[name], grads[name]) for name in grads)
