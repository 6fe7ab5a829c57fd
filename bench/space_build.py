"""What a Space's first build costs: the serve image built from the Space bundle with no layer cached.

A new Space builds its image from the files `python -m serve deploy` uploads (`python -m serve bundle DIR` writes the
same set) with an empty cache, so it compiles llama-cpp-python from source. This builds exactly that with podman
(`--no-cache`: every layer is built again; the base image is already on the machine, as a Space's builder pulls it
first), timing the whole build and each step. The engine and base images come from `.ci/images.sh setup`.

A Space's builder has its CPUs to itself; this machine may be running other jobs. So each RUN step's cgroup gets
cpu.shares PRIORITY_SHARES and the others take what the build leaves (`--share-cpu`: no priority). The JSON records
the RUN steps' CPU time (cgroup accounting), `podman_cpu_s` (the processes this script waited for: podman and the
ones it reaped) and the load average while it ran.

    python bench/space_build.py --out bench/results/space_build-cpu-2c.json [--tag localhost/loraship-serve:bench]

Prints a table (the build's steps, slowest first) and writes JSON; the image stays, tagged, for
`bench/space_cold_start.py --image TAG`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import markdown_table, versions  # noqa: E402

#: What .ci/images.sh builds on: its stand-in for python:3.11-slim (no registry is reachable here).
BASE = "localhost/loraship-ci/python:3.11-slim"
LIMIT_S = 600  # the first build must stay under 10 minutes
# A multi-stage build prefixes each step with its stage: "[1/2] STEP 3/13: RUN ...".
STEP = re.compile(r"^(?:\[(\d+)/\d+\] )?STEP (\d+)/(\d+): (.*)$")
CPUACCT, CPU = Path("/sys/fs/cgroup/cpuacct"), Path("/sys/fs/cgroup/cpu")
#: cpu.shares of each RUN step's cgroup (the most cgroup v1 allows; 1024 is one task's): other work on this machine
#: then takes only what the build leaves, so the build has the 2 cores as a Space's builder has its own.
PRIORITY_SHARES = 262144


def podman_env() -> dict[str, str]:
    """The environment podman runs in, with the engine config `.ci/images.sh setup` writes."""
    subprocess.run(["bash", str(ROOT / ".ci" / "images.sh"), "setup"], check=True, stdout=subprocess.DEVNULL)
    return {**os.environ, "CONTAINERS_CONF": str(ROOT / ".cache" / "containers" / "containers.conf")}


def commit() -> str:
    """The checkout's commit, marked when a file the bundle is made of differs from it."""
    from serve.bundle import SOURCES

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *SOURCES.values()], cwd=ROOT,
                           capture_output=True, text=True).stdout
    return head.strip() + (" (with local changes)" if dirty.strip() else "")


def machine() -> dict:
    return {"cpus": os.cpu_count(), "load_average_before": list(os.getloadavg()),
            "podman": subprocess.run(["podman", "--version"], capture_output=True, text=True).stdout.strip()}


class CpuMeter(threading.Thread):
    """CPU-seconds of the build's RUN steps and the machine's load while it runs.

    podman (buildah) runs each RUN step in a cgroup of its own, ``buildah-buildah<N>`` at the top of the cpuacct
    hierarchy, removed when the step ends: polled every 0.2 s, each one's last reading is its CPU time (less at most
    0.2 s). The load average is sampled every 5 s: other work on the machine slows the build's wall time.
    """

    def __init__(self, steps: list[dict], shares: int | None) -> None:
        super().__init__(daemon=True)
        self.before = set(CPUACCT.glob("buildah-*"))
        self.steps = steps  # the build's steps so far: a new cgroup belongs to the last one
        self.step_of: dict[str, int] = {}
        self.shares = shares
        self.usage_ns: dict[str, int] = {}
        self.loads: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        last_load = 0.0
        while not self.done.is_set():
            for group in set(CPUACCT.glob("buildah-*")) - self.before:
                if group.name not in self.step_of and self.shares:
                    with contextlib.suppress(OSError):
                        (CPU / group.name / "cpu.shares").write_text(str(self.shares))
                self.step_of.setdefault(group.name, len(self.steps) - 1)
                try:
                    self.usage_ns[group.name] = int((group / "cpuacct.usage").read_text())
                except (OSError, ValueError):
                    pass
            if time.monotonic() - last_load >= 5:
                self.loads.append(os.getloadavg()[0])
                last_load = time.monotonic()
            time.sleep(0.2)

    def cpu_s(self) -> float | None:
        return round(sum(self.usage_ns.values()) / 1e9, 1) if CPUACCT.is_dir() else None


def timed_build(bundle: Path, tag: str, base: str, env: dict, log: Path,
                shares: int | None = None) -> tuple[float, list[dict], dict]:
    """Build the bundle's Dockerfile with no cache; the wall seconds, each step's seconds (from the log's pace), and
    the CPU time and load it ran with."""
    command = ["podman", "build", "--no-cache", "--pull=never", "--format", "docker", "--build-arg",
               f"BASE_IMAGE={base}", "-f", str(bundle / "Dockerfile"), "-t", tag, str(bundle)]
    steps: list[dict] = []
    meter = CpuMeter(steps, shares)
    meter.start()
    own_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            out.write(line)
            now = time.perf_counter() - started
            match = STEP.match(line.strip())
            if match:
                if steps:
                    steps[-1]["seconds"] = round(now - steps[-1]["start_s"], 1)
                steps.append({"stage": match[1], "step": f"{match[2]}/{match[3]}", "instruction": match[4][:160],
                              "start_s": round(now, 1),
                              "load_1m": round(os.getloadavg()[0], 2)})
        rc = process.wait()
    wall = time.perf_counter() - started
    meter.done.set()
    meter.join()
    own = resource.getrusage(resource.RUSAGE_CHILDREN)
    if steps:
        steps[-1]["seconds"] = round(wall - steps[-1]["start_s"], 1)
    if rc != 0:
        sys.exit(f"podman build failed (exit {rc}); its log: {log}")
    for name, ns in meter.usage_ns.items():
        if steps:
            step = steps[min(max(meter.step_of[name], 0), len(steps) - 1)]
            step["cpu_s"] = round(step.get("cpu_s", 0) + ns / 1e9, 1)
    cpu = {"run_steps_cpu_s": meter.cpu_s(), "run_steps_cpu_shares": shares or 1024,
           "podman_cpu_s": round(own.ru_utime + own.ru_stime - own_before.ru_utime - own_before.ru_stime, 1),
           "load_average_samples": [round(x, 2) for x in meter.loads],
           "load_average_mean": round(sum(meter.loads) / len(meter.loads), 2) if meter.loads else None}
    return wall, steps, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="localhost/loraship-serve:bench", help="tag for the built image")
    parser.add_argument("--base", default=BASE, help="BASE_IMAGE build argument (the stand-in for python:3.11-slim)")
    parser.add_argument("--share-cpu", action="store_true",
                        help="let other work on the machine compete with the build (default: the build's RUN steps "
                             f"get cpu.shares {PRIORITY_SHARES}, so it has the cores to itself, as a Space's builder has)")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args(argv)
    shares = None if args.share_cpu else PRIORITY_SHARES

    env = podman_env()
    facts = machine()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        subprocess.run([sys.executable, "-m", "serve", "bundle", str(bundle)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
        files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
        log = Path(tmp) / "build.log"
        wall, steps, cpu = timed_build(bundle, args.tag, args.base, env, log, shares)
        tail = log.read_text().splitlines()[-3:]
    facts["load_average_after"] = list(os.getloadavg())
    size = int(subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", args.tag], env=env,
                              capture_output=True, text=True, check=True).stdout.strip())
    result = {
        "what": "podman build --no-cache of the Space bundle (python -m serve bundle)", "commit": commit(),
        "wall_s": round(wall, 1), "limit_s": LIMIT_S, "under_limit": wall < LIMIT_S,
        "image": args.tag, "image_bytes": size, "base": args.base, "bundle_files": len(files),
        "cpu": cpu, "steps": steps, "build_log_tail": tail, "machine": facts,
        "versions": versions(("llama-cpp-python",)),
    }
    rows = [[s["step"], s["instruction"][:70], s["seconds"], s.get("cpu_s", "")]
            for s in sorted(steps, key=lambda s: -s["seconds"])[:6]]
    print(markdown_table(["step", "instruction", "wall s", "CPU s"], rows))
    print(f"whole build: {wall:.1f} s (limit {LIMIT_S} s); image {size / 1e6:.0f} MB; CPU time of its RUN steps "
          f"{cpu['run_steps_cpu_s']} s; mean load average {cpu['load_average_mean']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if wall < LIMIT_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
