"""Whether torch can start CUDA here and, when it cannot, one line saying why and what fixes it.

A torch wheel carries its own CUDA runtime, so the host's NVIDIA driver is what decides: each CUDA major release
needs a driver branch at least as new as the one below (NVIDIA's CUDA Compatibility guide, minor version
compatibility). The training image is built for one flavour (``--build-arg TORCH_CUDA``) and records it in
``LORASHIP_TORCH_CUDA``; ``python -m train.cuda_check`` is the image's check before a run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

FLAVOUR_ENV = "LORASHIP_TORCH_CUDA"
#: The CUDA builds of torch the training image offers (TORCH_CUDA), oldest first.
FLAVOURS = ("cu126", "cu128", "cu130")
#: Oldest Linux driver branch each CUDA major release runs on.
MIN_DRIVER = {11: "450", 12: "525", 13: "580"}
PROC_DRIVER_VERSION = Path("/proc/driver/nvidia/version")
WHEEL_INDEX = "https://download.pytorch.org/whl/"
_VERSION = re.compile(r"\b\d+(?:\.\d+)+\b")


def parse_version(text: str) -> tuple[int, ...]:
    """``"535.104.05"`` -> ``(535, 104, 5)``."""
    return tuple(int(part) for part in text.strip().split("."))


def flavour_of(cuda_version: str | None) -> str | None:
    """torch's ``torch.version.cuda`` (``"12.8"``) as a wheel flavour (``"cu128"``); None for a CPU build."""
    return "cu" + cuda_version.replace(".", "") if cuda_version else None


def min_driver(flavour: str) -> str:
    """The oldest driver a flavour runs on: ``"cu128"`` -> ``"525"``."""
    return MIN_DRIVER[int(flavour[2:-1])]


def runs_on(driver: str, flavour: str) -> bool:
    return parse_version(driver) >= parse_version(min_driver(flavour))


def newest_flavour_for(driver: str) -> str | None:
    """The newest of FLAVOURS this driver runs, or None when it is older than all of them."""
    fitting = [flavour for flavour in FLAVOURS if runs_on(driver, flavour)]
    return fitting[-1] if fitting else None


def driver_from_proc(text: str) -> str | None:
    """The version in /proc/driver/nvidia/version's first line (``NVRM version: ... Kernel Module  535.104.05 ...``)."""
    first_line = text.splitlines()[0] if text else ""
    found = _VERSION.search(first_line.partition("Module")[2])
    return found.group(0) if found else None


def host_driver_version(proc_file: Path = PROC_DRIVER_VERSION) -> str | None:
    """The NVIDIA driver's version from ``nvidia-smi``, else from ``proc_file``; None when neither says."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            done = None
        lines = done.stdout.split() if done and done.returncode == 0 else []
        if lines and _VERSION.fullmatch(lines[0]):
            return lines[0]
    try:
        return driver_from_proc(proc_file.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None


def no_cuda_message(driver: str | None, flavour: str | None, reason: str | None) -> str:
    """One line: why CUDA does not start (the host's driver, torch's flavour, torch's own reason) and the fix."""
    if driver is None:
        return ("CUDA does not start: no NVIDIA driver is visible here (no nvidia-smi, no "
                "/proc/driver/nvidia/version); run the container with --gpus all, on a host with the NVIDIA driver "
                "and the NVIDIA Container Toolkit installed")
    best = newest_flavour_for(driver)
    reason = (reason or "").rstrip(".")
    if flavour is None:
        fix = (f"install torch built for {best} ({WHEEL_INDEX}{best})" if best
               else f"update the driver to >= {min_driver(FLAVOURS[0])}")
        return f"CUDA does not start: {reason or 'torch here is a CPU build'}; the NVIDIA driver is {driver}: {fix}"
    need = min_driver(flavour)
    if runs_on(driver, flavour):
        return (f"CUDA does not start although the NVIDIA driver {driver} is new enough for this torch "
                f"(TORCH_CUDA={flavour} needs >= {need}): {reason or 'torch sees no CUDA device'}; check that the "
                "container runs with --gpus all and that nvidia-smi works on the host")
    fix = (f"build the image with --build-arg TORCH_CUDA={best} (outside Docker: torch from {WHEEL_INDEX}{best}), "
           f"or update the driver to >= {need}" if best
           else f"no TORCH_CUDA flavour runs on it: update the driver to >= {need}")
    return (f"CUDA does not start: the NVIDIA driver is {driver} and this torch (TORCH_CUDA={flavour}) "
            f"needs >= {need}; {fix}")


def torch_reason(warning: str) -> str:
    """torch's "CUDA initialization: ... (Triggered internally at ...)" warning, as the reason alone."""
    return warning.removeprefix("CUDA initialization: ").split(" (Triggered internally")[0].splitlines()[0].strip()


def cuda_start_error() -> str | None:
    """None when torch starts CUDA here; else torch's reason. Looks once: torch remembers the answer."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return None
    reasons = [torch_reason(str(w.message)) for w in said if "CUDA" in str(w.message)]
    return reasons[0] if reasons else "torch sees no CUDA device"


def torch_flavour() -> str | None:
    """The image's TORCH_CUDA, else the installed torch's CUDA build; None for a CPU build."""
    if os.environ.get(FLAVOUR_ENV):
        return os.environ[FLAVOUR_ENV]
    try:
        import torch
    except ImportError:
        return None
    return flavour_of(torch.version.cuda)


def no_cuda_here(reason: str | None) -> str:
    """:func:`no_cuda_message` for this machine."""
    return no_cuda_message(host_driver_version(), torch_flavour(), reason)


def main(dotenv_file: str = ".env") -> int:
    """The training image's check before ``all`` and ``train``: 2 and the message on stderr when CUDA does not start;
    RECIPE=demo, the one run meant for a CPU, is not checked."""
    from train.settings import CPU_RECIPES, requested_recipe

    if requested_recipe(Path(dotenv_file)) in CPU_RECIPES:
        return 0
    reason = cuda_start_error()
    if reason is None:
        return 0
    print(f"error: {no_cuda_here(reason)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
