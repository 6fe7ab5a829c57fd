"""A continued run keeps the optimizer whose state its checkpoints hold (optimizer.pt is one optimizer's state)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train import model, run
from train.checkpoints import CHECKPOINTS_DIR, RUN_SETTINGS
from train.settings import TrainError, TrainSettings


def made_by_a_run(output_dir: Path, settings: TrainSettings, optimizer: str | None) -> None:
    """A checkpoint at step 10 and the run's settings record, as an interrupted run leaves them."""
    checkpoint = output_dir / CHECKPOINTS_DIR / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    if optimizer is None:  # a record written before the resolved optimizer was part of it
        (output_dir / RUN_SETTINGS).write_text(json.dumps(run.resume_sensitive(settings)))
    else:
        run.record_run_settings(output_dir, settings, optimizer)


def test_optimizer_auto_continues_with_the_optimizer_of_the_checkpoints(tmp_path):
    settings = TrainSettings(output_dir=str(tmp_path))
    made_by_a_run(tmp_path, settings, "adamw_8bit")
    said = []
    plan = run.keep_checkpoints_optimizer(tmp_path, settings, model.plan_for(settings, cuda=True), said.append)
    assert plan.optimizer == "adamw_8bit"
    assert said == ["note: OPTIMIZER=auto: continuing with adamw_8bit, the optimizer whose state the checkpoints hold"]


def test_another_optimizer_named_for_a_resume_is_refused_with_the_one_to_set(tmp_path):
    made_by_a_run(tmp_path, TrainSettings(output_dir=str(tmp_path)), "adamw_torch_fused")
    settings = TrainSettings(output_dir=str(tmp_path), optimizer="adamw_8bit")
    with pytest.raises(TrainError, match=r"OPTIMIZER='adamw_8bit': the checkpoints in .* hold adamw_torch_fused's "
                                         r"state.*set OPTIMIZER=adamw_torch_fused \(or auto\)"):
        run.keep_checkpoints_optimizer(tmp_path, settings, model.plan_for(settings, cuda=True), print)


def test_checkpoints_of_a_run_from_before_the_fused_default_continue_with_adamw_8bit_on_cuda(tmp_path):
    settings = TrainSettings(output_dir=str(tmp_path))
    made_by_a_run(tmp_path, settings, None)
    plan = run.keep_checkpoints_optimizer(tmp_path, settings, model.plan_for(settings, cuda=True), lambda _: None)
    assert plan.optimizer == "adamw_8bit"
    on_cpu = run.keep_checkpoints_optimizer(tmp_path, settings, model.plan_for(settings, cuda=False), lambda _: None)
    assert on_cpu.optimizer == "adamw_torch"  # what auto meant on a CPU then as now


def test_a_new_output_dir_takes_the_planned_optimizer(tmp_path):
    settings = TrainSettings(output_dir=str(tmp_path))
    (tmp_path / RUN_SETTINGS).write_text(json.dumps({run.RESOLVED_OPTIMIZER: "adamw_8bit"}))  # a record, no checkpoint
    plan = run.keep_checkpoints_optimizer(tmp_path, settings, model.plan_for(settings, cuda=True), print)
    assert plan.optimizer == "adamw_torch_fused"


def test_the_run_settings_record_names_the_optimizer_the_run_used(tmp_path):
    settings = TrainSettings(output_dir=str(tmp_path))
    run.record_run_settings(tmp_path, settings, "adamw_torch_fused")
    record = json.loads((tmp_path / RUN_SETTINGS).read_text())
    assert record[run.RESOLVED_OPTIMIZER] == "adamw_torch_fused" and record["LORA_R"] == settings.lora_r
