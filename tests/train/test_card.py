"""The adapter's model card is pushed as it is: it names the base and dataset without local paths and gives
the train loss the trainer logged."""

from __future__ import annotations

from loraship.embedded import EMBEDDED_HUB_ID
from loraship.public import public_name, without_local_paths
from train.card import final_train_loss, model_card


def summary(base_model: str, dataset: str, log_history: list[dict]) -> dict:
    return {
        "base_model": base_model, "base_model_resolved": "/root/.cache/loraship/embedded/SmolLM2-135M-Instruct",
        "base_model_hub_id": EMBEDDED_HUB_ID if base_model == "embedded" else None, "load_in_4bit": True,
        "optimizer": "adamw_torch", "global_step": 2, "runtime_s": 9.0, "device": "CPU",
        "final_train_loss": final_train_loss(log_history), "best_eval_loss": None, "best_step": None,
        "data": {"format": "messages", "train_rows": 10, "eval_rows": 0, "train_tokens": 900},
        "settings": {"DATASET": dataset, "LORA_R": 8, "ASSISTANT_ONLY_LOSS": True}, "hub_repo": None,
    }


def test_a_run_shorter_than_logging_steps_reports_the_trainers_closing_train_loss():
    # Two steps with LOGGING_STEPS=10: no step loss, only the closing entry.
    history = [{"train_runtime": 9.0, "train_loss": 1.931, "epoch": 0.2, "step": 2}]
    card = model_card(summary("embedded", "/home/someone/data.jsonl", history), dataset_is_hub=False)
    assert "- Final train loss: 1.9310" in card
    assert final_train_loss([{"loss": 2.5, "step": 1}, {"loss": 2.1, "step": 2}, {"train_loss": 2.3, "step": 2}]) == 2.1
    assert final_train_loss([]) is None


def test_the_card_names_the_embedded_base_by_hub_id_and_a_local_dataset_by_file_name():
    card = model_card(summary("embedded", "/home/someone/data/quokka.jsonl", []), dataset_is_hub=False)
    assert f"- Base model: `{EMBEDDED_HUB_ID}` (loraship's embedded copy" in card
    assert "- Dataset: `quokka.jsonl`" in card
    assert "/root/" not in card and "/home/" not in card


def test_public_names_keep_hub_ids_and_drop_local_paths(tmp_path):
    base = tmp_path / "my-base"
    base.mkdir()
    assert public_name("embedded") == EMBEDDED_HUB_ID
    assert public_name(str(base)) == "my-base" and public_name(f"{base}/") == "my-base"
    assert public_name("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert without_local_paths({"OUTPUT_DIR": "/work/out/train", "TYPES": ["~/x.txt", "Q4_K_M"], "N": 3}) == {
        "OUTPUT_DIR": "train", "TYPES": ["x.txt", "Q4_K_M"], "N": 3}
