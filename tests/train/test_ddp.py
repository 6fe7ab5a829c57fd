"""Several processes with packed batches (DDP, as on several GPUs): two real CPU processes (gloo) via torchrun.

The worker (tests/train/ddp_worker.py) builds the trainer ``python -m train`` builds, with padding-free packing on
(the GPU plan's), and reports which rows each process trained on, the loss and metrics against trl's own, and what
two real steps logged.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.train import ddp_worker
from tests.train.test_preemption import REPO
from train.balance import BalancedSampler, chunk_tokens

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tiny_llama_dir, embedded_tokenizer_dir):
    out = tmp_path_factory.mktemp("ddp")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(REPO / "tests" / "train" / "ddp_worker.py"), str(tiny_llama_dir), str(embedded_tokenizer_dir), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=400,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


def test_each_process_trains_its_share_of_every_step_with_about_the_same_tokens(two_processes):
    lengths, rows = ddp_worker.LENGTHS, ddp_worker.BATCH_SIZE
    order = BalancedSampler(lengths, rows, 2, ddp_worker.SEED).order()
    expected = [sorted(lengths[i] for i in order[start:start + rows]) for start in range(0, len(order), rows)]
    # Process r takes the r-th chunk of each step's window.
    assert two_processes[0]["micro_batches"] == expected[0::2]
    assert two_processes[1]["micro_batches"] == expected[1::2]
    tokens = chunk_tokens(order, lengths, rows)
    for step in range(len(tokens) // 2):
        assert abs(tokens[2 * step] - tokens[2 * step + 1]) <= max(lengths)


def test_the_loss_gradients_and_metrics_are_trls_own_in_every_process(two_processes):
    for seen in two_processes:
        theirs, ours = seen["loss"]
        assert ours == pytest.approx(theirs, rel=1e-6)
        assert seen["grads_max_diff"] <= 1e-6 * seen["grads_max"]
        for name, (their_value, our_value) in seen["metrics"].items():
            assert our_value == pytest.approx(their_value, rel=1e-6), name
    # The metrics are over both processes: each one logs the same values.
    assert two_processes[0]["metrics"] == two_processes[1]["metrics"]


def test_the_logged_token_count_covers_both_processes(two_processes):
    logged = two_processes[0]["logged"]
    assert [entry["step"] for entry in logged] == [1, 2]
    # Two steps of 2 x 3 rows are the whole epoch of 12 rows.
    assert logged[-1]["num_tokens"] == sum(ddp_worker.LENGTHS)
    assert 0 < logged[0]["num_tokens"] < sum(ddp_worker.LENGTHS)
    assert all(entry["entropy"] > 0 and 0 <= entry["mean_token_accuracy"] <= 1 for entry in logged)
    assert two_processes[1]["logged"] == logged
