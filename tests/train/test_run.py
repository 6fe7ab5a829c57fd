"""A few real training steps of a tiny random-init Llama through the whole stage.

The tiny model (hidden 64, 2 layers, the real SmolLM2 tokenizer) trains in seconds on a CPU,
so these tests run the same code path as a GPU run: data, SFTTrainer, eval, best-checkpoint
selection, the adapter folder, card, manifest, summary, plot and the Hub push (resuming is in
test_preemption.py).
"""

from __future__ import annotations

import json

import pytest

from loraship.manifest import read_manifest, verify_files
from tests.fixtures.train_runs import QUOKKA, SECRET, tiny_settings
from train.run import build_trainer, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir):
    out = tmp_path_factory.mktemp("train-run") / "out"
    lines: list[str] = []
    summary = train(tiny_settings(tiny_llama_dir, out), echo=lines.append)
    return out, summary, lines


@pytest.mark.slow
def test_adapter_folder_has_the_peft_layout_tokenizer_card_and_manifest(trained, tiny_llama_dir):
    out, summary, _ = trained
    adapter = out / "adapter"
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "README.md", "manifest.json"} <= names
    assert not any(n.startswith(".tmp-") for n in (p.name for p in out.iterdir()))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert "<|im_start|>" in tokenizer.chat_template

    manifest = read_manifest(adapter)
    assert manifest["kind"] == "adapter" and manifest["stage"] == "train"
    # The folder is pushed as it is: the local base and dataset appear by name (train_summary.json keeps the paths).
    assert summary["base_model"] == str(tiny_llama_dir)
    assert manifest["inputs"]["base_model"] == config["base_model_name_or_path"] == tiny_llama_dir.name
    assert manifest["inputs"]["base_model_is_local"] is True
    assert manifest["inputs"]["dataset"] == QUOKKA.name
    assert manifest["settings"]["DATASET"] == QUOKKA.name and manifest["settings"]["OUTPUT_DIR"] == out.name
    assert manifest["settings"]["LORA_R"] == 8 and "HF_TOKEN" not in manifest["settings"]
    assert verify_files(adapter) == []
    assert {f["name"] for f in manifest["files"]} == names - {"manifest.json"}


@pytest.mark.slow
def test_model_card_carries_hub_metadata_and_the_eval_loss(trained):
    import yaml

    out, summary, _ = trained
    text = (out / "adapter" / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "peft"
    assert front["hyperparameters"]["lora_r"] == 8
    assert front["hyperparameters"]["optimizer"] == "adamw_torch"
    metric = front["model-index"][0]["results"][0]["metrics"][0]
    assert metric["value"] == pytest.approx(summary["best_eval_loss"], abs=1e-4)
    assert f"- Final train loss: {summary['train_losses'][-1][1]:.4f}" in text
    assert str(out.parent) not in text and str(QUOKKA) not in text


@pytest.mark.slow
def test_the_final_adapter_is_the_checkpoint_with_the_lowest_eval_loss(trained):
    from safetensors.torch import load_file

    out, summary, lines = trained
    evals = dict((step, loss) for step, loss in summary["eval_losses"])
    assert sorted(evals) == [2, 4]
    best = min(evals, key=evals.get)
    assert summary["best_step"] == best and summary["best_eval_loss"] == pytest.approx(evals[best])
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    chosen = load_file(out / "checkpoints" / f"checkpoint-{best}" / "adapter_model.safetensors")
    assert final.keys() == chosen.keys()
    assert all((final[k] == chosen[k]).all() for k in final)
    assert any("moving average of last 2" in line for line in lines)
    assert len(summary["eval_loss_moving_average"]) == 2


@pytest.mark.slow
def test_summary_plot_and_tensorboard_logs(trained):
    out, summary, _ = trained
    on_disk = json.loads((out / "train_summary.json").read_text())
    assert on_disk["global_step"] == 4 and len(on_disk["train_losses"]) == 4
    assert on_disk["tokens"]["train_rows_tokens"] > on_disk["tokens"]["train_loss_tokens"] > 0
    assert on_disk["tokens"]["input_tokens_seen"] > 0
    assert on_disk["runtime_s"] > 0 and on_disk["data"]["eval_rows"] == 8
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "runs").rglob("events.out.tfevents.*"))
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".md", ".txt", ""}:
            assert SECRET not in path.read_text(errors="ignore"), path


def test_the_summary_and_the_done_line_give_the_pace_after_the_first_step(trained):
    out, summary, lines = trained
    pace = json.loads((out / "train_summary.json").read_text())["throughput"]
    # 4 steps, evaluated and saved at 2 and 4: step 1 is the warm-up, step 3's interval held step 2's evaluation
    assert (pace["from_step"], pace["to_step"], pace["steps"]) == (2, 4, 2)
    assert pace["tokens_per_s"] > 0 and pace["rows_per_s"] == pytest.approx(2 * 4 / pace["seconds"], rel=0.01)
    assert f"({pace['tokens_per_s']:,.0f} tokens/s from step 2)" in [line for line in lines if line.startswith("done:")][0]


def test_the_trainer_sees_exactly_our_labels(tmp_path, tiny_llama_dir):
    """trl 1.16 must neither re-tokenize nor re-mask: the batch holds our input_ids and labels."""
    from train import data, model

    settings = tiny_settings(tiny_llama_dir, tmp_path / "out", batch_size=6)
    plan = model.plan_for(settings, cuda=False)
    tokenizer = model.load_tokenizer(str(tiny_llama_dir), chat_template=None)
    rows = data.read_rows(str(QUOKKA), max_samples=6)
    examples = data.build_examples(rows, tokenizer, fmt="messages", max_seq_length=128)
    peft_model = model.load_for_training(str(tiny_llama_dir), plan, settings)
    trainer = build_trainer(settings, plan, peft_model, tokenizer, examples, [], tmp_path / "ckpt", print)
    batch = next(iter(trainer.get_train_dataloader()))
    seen = set()
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        assert (labels[n:] == -100).all()
        seen.add((tuple(ids[:n].tolist()), tuple(labels[:n].tolist())))
    assert seen == {(tuple(e.input_ids), tuple(e.labels)) for e in examples}


@pytest.mark.slow
def test_four_bit_base_on_cpu_trains_with_float32_compute(tmp_path, tiny_llama_dir):
    import math

    summary = train(
        tiny_settings(tiny_llama_dir, tmp_path / "out", load_in_4bit="true", max_steps=2, eval_size=4),
        echo=lambda _: None,
    )
    assert summary["load_in_4bit"] is True and summary["compute_dtype"] == "float32"
    assert all(math.isfinite(loss) for _, loss in summary["train_losses"])
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


@pytest.mark.slow
def test_hub_repo_set_pushes_the_adapter_folder_privately(tmp_path, tiny_llama_dir, hub_server):
    out = tmp_path / "out"
    summary = train(
        tiny_settings(tiny_llama_dir, out, max_steps=1, hub_repo="me/tiny-adapter", eval_size=4, eval_steps=1,
                      save_steps=1),
        echo=lambda _: None,
    )
    files = hub_server.repo_files("me/tiny-adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "manifest.json"} <= set(files)
    assert files["adapter_model.safetensors"] == (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert hub_server.is_private("me/tiny-adapter")
    assert hub_server.token_seen(SECRET)
    assert summary["hub_commit"]
    assert SECRET not in (out / "train_summary.json").read_text()


def test_a_tokenizer_larger_than_the_models_embedding_is_refused_before_training(tmp_path, embedded_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.fixtures.models import TINY_CONFIG
    from train.settings import TrainError

    small = tmp_path / "small-vocab"  # the real tokenizer (49,152 tokens) on weights with 1,000 rows
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, **TINY_CONFIG)).save_pretrained(small)
    embedded_tokenizer.save_pretrained(small)
    with pytest.raises(TrainError, match=r"outside the model's 1,000 embedding rows") as err:
        train(tiny_settings(small, tmp_path / "out"), echo=lambda _: None)
    assert "its tokenizer does not match its weights" in str(err.value)
    assert not (tmp_path / "out" / "adapter").exists()
