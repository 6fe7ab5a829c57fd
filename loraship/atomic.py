"""Writes that never leave a half-written file or folder at a final path.

Everything is first written under a temporary name in the same folder (same
filesystem, so the final ``os.replace`` is atomic) and renamed only once it is
complete. A process killed half-way leaves at most a ``.tmp-*`` entry behind,
which the next run ignores and cleans up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".tmp-"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it to ``final`` on success.

    Works for files and folders alike: the caller writes whatever it likes at
    the yielded path. On an exception the temporary entry is removed and
    ``final`` is left exactly as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}.", dir=final.parent))
    # mkdtemp gives a folder; callers writing a file want a free path.
    tmp.rmdir()
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            # Replace a folder: move the old one aside first, then swap.
            old = final.with_name(f"{TMP_PREFIX}{final.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink(missing_ok=True)
        raise


def write_text(final: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``final`` atomically (fsynced before the rename)."""
    with atomic_path(final) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(final)


def write_json(final: str | os.PathLike, data: object) -> Path:
    """Write ``data`` as indented JSON to ``final`` atomically."""
    return write_text(final, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_png(final: str | os.PathLike, figure, **savefig_options) -> Path:
    """Save a matplotlib ``figure`` as a PNG at ``final`` atomically, then close it."""
    with atomic_path(final) as tmp:
        figure.savefig(tmp, format="png", **savefig_options)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return Path(final)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete ``.tmp-*`` leftovers of a killed run in ``folder``; return what went."""
    folder = Path(folder)
    gone = []
    if not folder.is_dir():
        return gone
    for entry in folder.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            gone.append(entry)
    return gone
