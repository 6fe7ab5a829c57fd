"""One run over several GPUs: ``python -m train`` relaunches itself through torchrun (DDP).

With NUM_GPUS (default: every visible CUDA device) above one, and not already under a
distributed launcher, the command starts ``torch.distributed.run`` with one process per
GPU running ``-m train`` again. Each process loads its own 4-bit base on its own GPU;
only rank 0 logs, saves, writes the card and summary, and pushes. Checkpoints written by
any number of processes resume with any other number (Trainer's DDP checkpoints hold
one model and one optimizer state; only the RNG state is per rank).

The launcher fetches Hub checkpoints before it starts the processes, so that all of them
see the same local checkpoint; it forwards SIGTERM to torchrun, which passes it on to every
process (they agree on one step, save it and exit with status 75).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Callable, Sequence

#: Set for torchrun and every process it starts. NVLink multicast stays off in NCCL, PyTorch's symmetric
#: memory and NVSHMEM (the rented machines' rules: it can take a shared host's GPUs out of service); on
#: SIGTERM torchrun gives the processes this long to save their checkpoint before it SIGKILLs them (its
#: default, 30 s, is short for a large model's step plus save).
LAUNCH_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
              "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "55"}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def under_launcher() -> bool:
    """Started by torchrun (or another launcher that sets the torch.distributed variables)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def cuda_device_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def processes_wanted(num_gpus: int | None, visible: int) -> int:
    """One process per GPU: NUM_GPUS, or every visible device; one process without CUDA."""
    if visible == 0:
        return 1
    return num_gpus if num_gpus is not None else visible


def one_gpu_per_process(args) -> None:
    """Make transformers' training arguments ``args`` count one GPU in a run of one process on a host with several
    visible (NUM_GPUS=1, or fewer than visible without torchrun): transformers would otherwise take every visible
    GPU for nn.DataParallel and multiply BATCH_SIZE by their count, and a 4-bit model is never wrapped, so one GPU
    would run micro-batches that many times larger than asked. Under torchrun transformers counts one already."""
    if world_size() == 1 and args.n_gpu > 1:
        args._n_gpu = 1  # what transformers' Trainer itself sets for a model spread over GPUs


def torchrun_command(processes: int, argv: Sequence[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
        "-m", "train", *argv,
    ]


def relaunch(processes: int, argv: Sequence[str], echo: Callable[[str], None]) -> tuple[int, bool]:
    """Run this command again under torchrun; ``(exit status, whether SIGTERM came)``."""
    command = torchrun_command(processes, argv)
    echo(f"launch: {processes} processes (one per GPU, DDP): {' '.join(command[1:])}")
    child = subprocess.Popen(command, env={**os.environ, **LAUNCH_ENV})
    got_sigterm = False

    def forward(signum, frame):
        nonlocal got_sigterm
        got_sigterm = got_sigterm or signum == signal.SIGTERM
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, got_sigterm
