"""Several processes (DDP): the launch decision, and a real 2-process run on CPU (gloo) via torchrun.

No multi-GPU machine is at hand in CI, so the GPU part (NUM_GPUS -> torchrun, NCCL) is covered
by the pure launch functions; the 2-process run exercises everything the processes do: the
rank-0-only writes, the global batch, DDP checkpoints, and resuming them with one process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.train.test_preemption import REPO, stage_env, settings_from
from train.launch import LAUNCH_ENV, processes_wanted, torchrun_command


def test_one_process_per_visible_gpu_unless_num_gpus_says_otherwise():
    assert processes_wanted(None, visible=0) == 1
    assert processes_wanted(4, visible=0) == 1  # no CUDA: NUM_GPUS does not apply
    assert processes_wanted(None, visible=1) == 1
    assert processes_wanted(None, visible=8) == 8
    assert processes_wanted(2, visible=8) == 2


def test_the_relaunch_is_torchrun_of_this_command_with_nvlink_multicast_off():
    command = torchrun_command(4, ["--env-file", "x.env"])
    assert command == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                       "-m", "train", "--env-file", "x.env"]
    assert LAUNCH_ENV["NCCL_NVLS_ENABLE"] == "0"
    assert LAUNCH_ENV["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1" and LAUNCH_ENV["NVSHMEM_DISABLE_NVLS"] == "1"
    assert int(LAUNCH_ENV["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < 60  # SIGTERM to exit within a minute


@pytest.mark.slow
def test_two_cpu_processes_train_one_adapter_with_a_doubled_batch_and_one_process_resumes(tmp_path, tiny_llama_dir):
    from train.run import train

    out = tmp_path / "out"
    env = stage_env(tiny_llama_dir, out, MAX_STEPS="2", SAVE_STEPS="2", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "train",
         "--env-file", str(tmp_path / "none.env")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]

    # Only rank 0 talks and writes: one report, one summary, one adapter, one "done".
    assert output.count("done: 2 steps") == 1 and output.count("data: 16 rows read") == 1
    assert "batch: 2 rows x 1 accumulation x 2 processes = 4 rows per optimizer step" in output
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["processes"], summary["global_batch_size"], summary["global_step"]) == (2, 4, 2)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(out.glob(".tmp-*")) and not list(out.glob("**/adapter/adapter"))
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"} <= {p.name for p in ckpt.iterdir()}
    # Two processes of batch 2 take 4 of the 16 rows per step: 2 steps are half an epoch (one process: a quarter).
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["epoch"] == 0.5

    # The same checkpoints continue in one process.
    summary = train(settings_from(env, max_steps=3), echo=lambda _: None)
    assert summary["resumed_from_step"] == 2 and summary["global_step"] == 3 and summary["processes"] == 1


def args_on_a_host_with_two_gpus(folder):
    """transformers' training arguments as it sets them in one process that sees two GPUs."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(folder), per_device_train_batch_size=8, report_to=[])
    _ = args.n_gpu  # transformers counts this machine's GPUs once (so the test runs on a GPU host too)
    args._n_gpu = 2
    assert args.train_batch_size == 16  # BATCH_SIZE x the GPUs nn.DataParallel would take
    return args


def test_one_process_on_a_host_with_two_gpus_trains_on_one_with_the_batch_it_was_given(monkeypatch, tmp_path):
    from train.launch import one_gpu_per_process

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = args_on_a_host_with_two_gpus(tmp_path)
    one_gpu_per_process(args)
    assert (args.n_gpu, args.train_batch_size) == (1, 8)


def test_under_torchrun_the_gpu_count_is_left_to_transformers(monkeypatch, tmp_path):
    from train.launch import one_gpu_per_process

    monkeypatch.setenv("WORLD_SIZE", "2")
    args = args_on_a_host_with_two_gpus(tmp_path)
    one_gpu_per_process(args)
    assert args.n_gpu == 2
