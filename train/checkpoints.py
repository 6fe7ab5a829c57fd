"""Checkpoints: finding the newest complete one, mirroring them to the Hub, and saving one on SIGTERM.

A rented GPU can be taken away at any time (spot instances, preemptible VMs, a
scheduler's SIGTERM). The run must then lose at most the step in progress:

- SIGTERM while training: the current optimizer step finishes, a checkpoint is saved
  at exactly that step (and pushed when HUB_REPO is set), and the process exits with
  :data:`PREEMPTED_EXIT` after saying how to continue. SIGTERM at any other time
  (loading, the final save) exits at once with the same status: every final file is
  written atomically, so nothing half-written is left behind.
- With HUB_REPO set, ``OUTPUT_DIR/checkpoints`` is mirrored to the repo's
  ``checkpoints/`` folder after every save, so a new machine with an empty OUTPUT_DIR
  continues from the Hub.
- A rerun whose checkpoints already reached the last step trains nothing: it only
  writes the final files again (what a kill during the final save left undone).
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

from loraship.atomic import atomic_path, write_json

#: Exit status of a run stopped by SIGTERM (sysexits' EX_TEMPFAIL: "try again later");
#: 1 is a crash, 2 a user error.
PREEMPTED_EXIT = 75
#: Where checkpoints live, locally under OUTPUT_DIR and in the Hub repo.
CHECKPOINTS_DIR = "checkpoints"
RUN_SETTINGS = "run_settings.json"


class Preempted(BaseException):
    """The run was told to stop (SIGTERM). A BaseException so that no ``except Exception`` on the way
    out (Hub calls, dataset readers) mistakes it for their own failure."""

    exit_code = PREEMPTED_EXIT


def preempted_message(output_dir: Path, hub_repo: str | None) -> str:
    """What a stopped run tells the user: where it got to and how to continue."""
    last = last_checkpoint(output_dir / CHECKPOINTS_DIR)
    where = "no checkpoint was saved yet"
    if last is not None:
        where = f"the last checkpoint is step {step_of(last)} ({last}"
        where += f", also in {hub_repo}/{CHECKPOINTS_DIR})" if hub_repo else ")"
    return (
        f"stopped by SIGTERM: {where}. Rerun with the same OUTPUT_DIR={str(output_dir)!r}"
        + (f" (or HUB_REPO={hub_repo!r} on a new machine)" if hub_repo else "")
        + " to continue from there."
    )


class AlreadyTrained(Exception):
    """The checkpoint resumed from has reached the last step: nothing is left to train."""


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[-1])


def is_complete(checkpoint: Path) -> bool:
    """Trainer writes trainer_state.json last: a folder with a readable one holds everything before it."""
    state = checkpoint / "trainer_state.json"
    if not (checkpoint.is_dir() and checkpoint.name.rsplit("-", 1)[-1].isdigit() and state.is_file()):
        return False
    try:
        return isinstance(json.loads(state.read_text(encoding="utf-8")).get("global_step"), int)
    except (OSError, ValueError):
        return False  # cut short by a kill while it was being written


def last_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` folder, if any."""
    if not checkpoints.is_dir():
        return None
    found = [p for p in checkpoints.glob("checkpoint-*") if is_complete(p)]
    return max(found, key=step_of) if found else None


def point_best_checkpoint_here(checkpoint: Path) -> None:
    """Make the resumed state's best checkpoint path a local one.

    The state records it as a path: after a move to another machine or folder that path is
    gone, and transformers would silently forget which checkpoint was best.
    """
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text(encoding="utf-8"))
    best = state.get("best_global_step")
    local = checkpoint.parent / f"checkpoint-{best}"
    if best and local.is_dir() and state.get("best_model_checkpoint") != str(local):
        state["best_model_checkpoint"] = str(local)
        write_json(path, state)


# --------------------------------------------------------------------------
# The Hub mirror
# --------------------------------------------------------------------------


def push_checkpoints(output_dir: Path, repo: str, *, token: str | None, private: bool, step: int) -> str:
    """Make the repo's ``checkpoints/`` folder an exact copy of ``OUTPUT_DIR/checkpoints``."""
    from loraship.hub import push_folder

    # Rotated-away checkpoints must go on the Hub too, or the repo grows by one checkpoint per save.
    return push_folder(
        output_dir / CHECKPOINTS_DIR, repo, token=token, private=private, path_in_repo=CHECKPOINTS_DIR,
        delete_patterns=["*"], commit_message=f"loraship checkpoint at step {step}",
    )


def pull_checkpoints(output_dir: Path, repo: str, *, token: str | None) -> Path | None:
    """Fetch the repo's checkpoints into an OUTPUT_DIR that has none; the newest complete one, or None."""
    from loraship.hub import download_repo, list_repo_files

    files = list_repo_files(repo, token=token, setting="HUB_REPO", missing_ok=True)
    if not any(f.startswith(f"{CHECKPOINTS_DIR}/checkpoint-") and f.endswith("/trainer_state.json") for f in files):
        return None
    snapshot = download_repo(repo, token=token, allow_patterns=[f"{CHECKPOINTS_DIR}/*"], setting="HUB_REPO")
    remote = snapshot / CHECKPOINTS_DIR
    local = output_dir / CHECKPOINTS_DIR
    local.mkdir(parents=True, exist_ok=True)
    for folder in sorted(remote.glob("checkpoint-*")):
        if is_complete(folder) and not (local / folder.name).exists():
            with atomic_path(local / folder.name) as tmp:
                shutil.copytree(folder, tmp)  # the snapshot holds symlinks into the Hub cache: copy the files
    if (remote / RUN_SETTINGS).is_file():
        shutil.copyfile(remote / RUN_SETTINGS, local / RUN_SETTINGS)
        # check_resumable compares the settings with this record before the run continues.
        shutil.copyfile(remote / RUN_SETTINGS, output_dir / RUN_SETTINGS)
    return last_checkpoint(local)


class MirrorToHub(TrainerCallback):
    """After every checkpoint save, push the checkpoints folder (main process only).

    A failed push does not stop training: the checkpoints stay local and the next save tries again.
    """

    def __init__(self, output_dir: Path, repo: str, *, token: str | None, private: bool, echo: Callable[[str], None]):
        self.output_dir, self.repo, self.token, self.private, self.echo = output_dir, repo, token, private, echo

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from loraship.hub import HubError

        try:
            push_checkpoints(self.output_dir, self.repo, token=self.token, private=self.private, step=state.global_step)
        except HubError as err:
            self.echo(f"warning: checkpoint-{state.global_step} not pushed ({err}); training goes on, "
                      "checkpoints stay in OUTPUT_DIR")
        else:
            self.echo(f"hub: checkpoint-{state.global_step} pushed to {self.repo}/{CHECKPOINTS_DIR}")


# --------------------------------------------------------------------------
# SIGTERM
# --------------------------------------------------------------------------


class StopOnSigterm(TrainerCallback):
    """SIGTERM during training: save a checkpoint at the step reached, then stop; at other times stop at once.

    Use as a context manager around the whole run (it installs the handler and restores the
    previous one) and as a Trainer callback. Under several processes every rank gets the signal
    at a slightly different moment: the ranks agree (an all-reduce of the flag) before stopping,
    so all of them save the same step.
    """

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.requested = False
        self.training = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        except ValueError:  # not the main thread (an embedding application): leave signals to it
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    def _on_signal(self, signum, frame):
        if not self.training:
            raise Preempted("stopped by SIGTERM")
        if not self.requested:
            self.requested = True
            self.echo("SIGTERM: finishing this step, then saving a checkpoint and stopping")

    def _stop_agreed(self, args) -> bool:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            flag = torch.tensor([1.0 if self.requested else 0.0], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.requested = bool(flag.item())
        return self.requested

    def on_train_begin(self, args, state, control, **kwargs):
        # Without this, transformers would run one step past the end of a finished run it resumes.
        if state.global_step >= state.max_steps > 0:
            raise AlreadyTrained(state.global_step)
        self.training = True

    def on_step_end(self, args, state, control, **kwargs):
        if self._stop_agreed(args):
            control.should_save = True
            control.should_training_stop = True

    def on_evaluate(self, args, state, control, **kwargs):
        # A signal that came during evaluation: save right after it instead of after one more step.
        self.on_step_end(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        if self.requested:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False
