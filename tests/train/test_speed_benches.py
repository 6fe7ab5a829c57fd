"""The GPU speed benches run end to end on the CPU (their ``--tiny`` modes), each as its own process.

They are measured on the device, a few minutes at a time: a bench that breaks on the CPU would spend that time
failing.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def bench(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"bench/{script}", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **(env or {})})


def run_bench(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    done = bench(script, *args, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def own_temporary_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A TMPDIR of its own for a bench (torch's inductor cache kept where it is, warm), to see what it leaves."""
    temp = tmp_path / "temp"
    temp.mkdir()
    inductor_cache = Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"
    return temp, {"TMPDIR": str(temp), "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)}


def test_the_throughput_bench_trains_both_stacks_on_the_same_rows_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "t.json"
    temp, env = own_temporary_folder(tmp_path)
    printed = run_bench("train_throughput.py", "--tiny", "--configs", "plain,loraship", "--warmup", "1", "--timed",
                        "2", "--out", str(out), env=env)
    plain, loraship = json.loads(out.read_text())["results"]
    assert (plain["config"], loraship["config"]) == ("plain", "loraship")
    assert abs(plain["loss_first"] - loraship["loss_first"]) < 1e-3  # same rows, same adapter init
    assert plain["tokens_per_step"] == loraship["tokens_per_step"] == [128] * 3
    assert plain["tokens_per_s"] > 0 and loraship["tokens_per_s"] > 0
    # What python -m train plans on CUDA (liger's Triton kernels aside), its two rows in one micro-batch.
    assert plain["levers"] == [] and "packing" in loraship["levers"] and loraship["micro_batching"] == [2, 1]
    assert any(lever.startswith("compile_mode=layers") for lever in loraship["levers"])
    assert "| tiny | loraship | 2x64 |" in printed
    assert [p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_")] == []


def test_the_pipelined_throughput_bench_times_whole_phases_and_compares_the_logged_loss_windows(tmp_path):
    """``--pipelined``: no synchronization inside the run but at the warm-up's end and the last step, so each
    step's time is its phase's mean; loraship's path logs every 10 steps as ``python -m train`` does, and the
    plain loop's losses are averaged over the same windows; both keep every step's loss as well. ``--set``
    changes loraship's train settings (here: eager, no torch.compile)."""
    out = tmp_path / "t.json"
    run_bench("train_throughput.py", "--tiny", "--configs", "plain,loraship", "--warmup", "2", "--timed", "18",
              "--pipelined", "--set", "TORCH_COMPILE=off", "--out", str(out))
    report = json.loads(out.read_text())
    assert (report["settings"]["pipelined"], report["settings"]["logging_steps"]) == (True, 10)
    plain, loraship = report["results"]
    assert loraship["train_settings"] == {"TORCH_COMPILE": "off"} and plain["train_settings"] == {}
    assert loraship["name"] == "loraship, TORCH_COMPILE=off" and "packing" in loraship["levers"]
    assert not any(lever.startswith("compile_mode") for lever in loraship["levers"])
    for result in (plain, loraship):
        assert result["pipelined"] and len(result["step_s"]) == 20
        assert len(set(result["step_s"][:2])) == 1 and len(set(result["step_s"][2:])) == 1  # one mean per phase
        assert len(result["losses"]) == 2  # steps 1-10 and 11-20
        steps = result["step_losses"]  # every step's loss too (loraship's kept on the GPU until the end)
        assert len(steps) == 20
        assert result["losses"] == pytest.approx([sum(steps[:10]) / 10, sum(steps[10:]) / 10], rel=1e-3)
    assert loraship["losses"] == pytest.approx(plain["losses"], rel=1e-3)  # same rows, same adapter init
    assert loraship["step_losses"] == pytest.approx(plain["step_losses"], rel=1e-2)


@pytest.mark.parametrize("args, says", [
    (["--recorded-real", "--warmup", "2", "--timed", "3"], "--timed (3) must not exceed --warmup (2)"),
    (["--set", "BATCH_SIZE=4"], "--set BATCH_SIZE: the bench sets it"),
    (["--set", "NO_SUCH_SETTING=1"], "not a train setting"),
    (["--set", "SAVED_MLP_MIB=lots"], "SAVED_MLP_MIB='lots'"),
    (["--configs", "defaults"], "unknown config 'defaults'"),
])
def test_the_throughput_bench_refuses_what_it_cannot_measure(args, says):
    done = bench("train_throughput.py", "--tiny", *args)
    assert done.returncode == 2 and says in done.stderr, done.stderr[-2000:]


def test_real_lengths_run_per_layer_graphs_each_in_a_process_of_its_own_and_time_recorded_lengths(tmp_path):
    """``--isolate``: each configuration measures in a process of its own, where loraship's plan is per-layer CUDA
    graphs; the packed lengths go through them and train as the plain stack does on the same rows.
    ``--recorded-real``: the timed steps repeat the warm-up's rows, so every packed length they run has had its
    CUDA graphs recorded (a long run's steady state)."""
    out = tmp_path / "t.json"
    run_bench("train_throughput.py", "--tiny", "--configs", "plain-real,loraship-real", "--warmup", "3",
              "--timed", "2", "--recorded-real", "--isolate", "--out", str(out))
    report = json.loads(out.read_text())
    plain, graphs = report["results"]
    assert (plain["config"], graphs["config"]) == ("plain-real", "loraship-real"), graphs.get("error")
    assert len({plain["pid"], graphs["pid"], os.getpid()}) == 3
    assert "compile_mode=layers-cudagraphs" in graphs["levers"] and graphs["micro_batching"] == [8, 1]
    assert report["settings"]["recorded_real"] is True
    for result in (plain, graphs):
        tokens = result["tokens_per_step"]
        assert len(tokens) == 5 and tokens[3:] == tokens[:2] and len(set(tokens[:3])) == 3  # three packed lengths
    assert graphs["tokens_per_s"] > 0
    assert graphs["losses"] == pytest.approx(plain["losses"], rel=1e-3)


def test_the_profile_diagnostic_reports_wall_time_and_the_busiest_operators_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "p.json"
    temp, env = own_temporary_folder(tmp_path)
    run_bench("diagnostics/train_profile.py", "--tiny", "--warmup", "1", "--active", "1", "--out", str(out), env=env)
    (result,) = json.loads(out.read_text())["results"]
    assert result["config"] == "loraship" and result["wall_ms_per_step"] > 0 and result["tokens_per_step"] == 128
    assert result["top_cpu"] and all(op["self_cpu_ms_per_step"] >= 0 for op in result["top_cpu"])
    assert [p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_")] == []


@pytest.mark.parametrize("script", ["diagnostics/sync_points.py", "diagnostics/memory_trace.py"])
def test_the_cuda_diagnostics_say_they_need_a_gpu(script):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the diagnostic runs")
    done = bench(script)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr and "run it on the device" in done.stderr


SCALING = ("--tiny", "--rows", "64", "--batch", "2", "--seq", "128", "--eval-size", "8")


@pytest.fixture(scope="module")
def scaling_run(tmp_path_factory):
    """One full scaling bench (its base, data and runs kept in a workdir): its record, what it printed, the workdir."""
    root = tmp_path_factory.mktemp("scaling")
    printed = run_bench("multi_gpu_scaling.py", *SCALING, "--steps", "8", "--logging-steps", "1", "--workdir",
                        str(root / "work"), "--out", str(root / "scaling.json"))
    return json.loads((root / "scaling.json").read_text()), printed, root / "work"


def test_the_scaling_bench_trains_one_and_two_processes_at_one_global_batch_and_compares_them(scaling_run):
    record, printed, _ = scaling_run
    one, two, share = record["results"]
    assert (one["processes"], two["processes"], share["processes"]) == (1, 2, 1)
    assert one["global_batch_size"] == two["global_batch_size"] == 4  # 2 rows x 2 accumulation, 2 rows x 2 processes
    assert share["global_batch_size"] == 2  # one process's share: the weak-scaling baseline
    assert record["comparison"]["tokens_per_step_ratio"] == pytest.approx(1.0, abs=0.2)  # the same rows a step
    assert one["throughput"]["tokens_per_s"] > 0 and two["throughput"]["from_step"] == 2
    # The comparison is rounded to three places, so it may sit up to half a thousandth from the exact ratio.
    assert record["comparison"]["speedup"] == pytest.approx(
        two["throughput"]["tokens_per_s"] / one["throughput"]["tokens_per_s"], abs=1e-3)
    assert record["comparison"]["efficiency"] == pytest.approx(record["comparison"]["speedup"] / 2, abs=1e-3)
    assert record["comparison"]["speedup_over_one_share"] == pytest.approx(
        two["throughput"]["tokens_per_s"] / share["throughput"]["tokens_per_s"], abs=1e-3)
    first, second = record["comparison"]["last_eval_loss"]
    assert abs(second - first) / first < 0.01  # the same global batch learns alike
    assert "| 2 processes | 2 | 4 |" in printed


def test_the_scaling_bench_runs_the_runs_asked_with_the_settings_given_and_reuses_its_base(scaling_run, tmp_path):
    _, _, work = scaling_run
    config = work / "base" / "config.json"
    built = config.stat().st_mtime_ns
    printed = run_bench("multi_gpu_scaling.py", *SCALING, "--workdir", str(work), "--steps", "6", "--runs", "one",
                        "--set", "MAX_STEPS=8", "--out", str(tmp_path / "b.json"))
    record = json.loads((tmp_path / "b.json").read_text())
    (run,) = record["results"]
    assert record["settings"] == {"MAX_STEPS": "8"} and "comparison" not in record
    # The setting reached the run, which started afresh in the folder the first invocation left (no resume).
    assert (run["processes"], run["global_step"], run["resumed_from_step"]) == (1, 8, None)
    assert config.stat().st_mtime_ns == built  # the base was kept, not built again
    assert "| 1 process | 1 | 4 |" in printed
