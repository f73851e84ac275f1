"""A run's checkpoint file: written whole or not at all, read back whole or set aside.

* :func:`atomic_write` writes into a temporary ``.part`` file in the target's folder and renames
  it: a file is never half-written under its real name, and a write that fails removes its
  ``.part`` file and raises.
* :func:`read_checkpoint` checks the file before unpickling it: torch's checkpoints are zip
  archives whose members carry a CRC-32, so a file truncated by a full disk or altered by a bad
  copy is recognised as such (:class:`DamagedCheckpointError`), not as a traceback from deep in
  torch's zip reader. :func:`set_aside` then renames it to ``<name>.damaged``: never deleted.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: The version :class:`~taskbalance.bench.runner.Runner` writes into its checkpoints.
CHECKPOINT_VERSION = 2

#: What a finished run's checkpoint keeps (all that resuming it needs): no model, optimizer or
#: method state.
FINISHED_STATE: tuple[str, ...] = (
    "version", "config", "data", "epoch", "history", "status", "diverged_epoch", "result",
)  # fmt: skip


class CheckpointMismatchError(ValueError):
    """A checkpoint to resume was written by another version, configuration or data."""


class DamagedCheckpointError(ValueError):
    """A checkpoint file cannot be read back whole (truncated, or altered by a bad copy)."""


class DamagedCheckpointWarning(RuntimeWarning):
    """A damaged checkpoint was set aside and its run trains from the start."""


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """``write(file)`` into a temporary file in ``path``'s folder, then rename it to ``path``: a
    file is never half-written under its real name. The file gets the mode any new file gets
    under the user's umask (the temporary file's private 0600 is not kept). When ``write`` (or
    the rename) raises, the temporary ``.part`` file is removed and the error raised.

    >>> import stat, tempfile
    >>> target = Path(tempfile.mkdtemp()) / "a.txt"
    >>> atomic_write(target, lambda f: f.write(b"hi"))
    >>> target.read_bytes(), stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()
    (b'hi', True)
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    part = tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False)  # noqa: SIM115
    try:
        with part:
            write(part)
        os.chmod(part.name, 0o666 & ~_umask())
        os.replace(part.name, path)
    except BaseException:
        Path(part.name).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_checkpoint(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`atomic_write`.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "run.pt"
    >>> save_checkpoint({"epoch": 1}, target); read_checkpoint(target)
    {'epoch': 1}
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def read_checkpoint(path: Path) -> Any:
    """The object :func:`save_checkpoint` wrote to ``path``.

    The zip archive is checked first (its structure and every member's CRC-32), then loaded
    with ``weights_only=True``. Raises :class:`DamagedCheckpointError` naming the file and
    what is wrong when it cannot be read back whole: truncated (a full disk, an interrupted
    copy), altered bytes, or anything else torch cannot unpickle. An ``OSError`` (no such file,
    no permission) is raised as it is: the file may be whole.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "run.pt"
    >>> _ = target.write_bytes(b"PK\\x03\\x04 cut short")
    >>> try:
    ...     read_checkpoint(target)
    ... except DamagedCheckpointError as error:
    ...     print(str(error).replace(str(target), "run.pt"))
    run.pt: damaged checkpoint (BadZipFile: File is not a zip file)
    """
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
        if broken is None:
            return torch.load(path, weights_only=True)
        why = f"{broken} fails its CRC check"
    except OSError:
        raise
    except Exception as error:  # corrupt bytes raise many kinds: BadZipFile, EOFError, ...
        lines = str(error).splitlines()
        why = type(error).__name__ + (f": {lines[0]}" if lines else "")
    raise DamagedCheckpointError(f"{path}: damaged checkpoint ({why})")


def set_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.damaged`` (``.damaged2``, ... when that name is taken, so
    that no earlier file is overwritten) and return the new path.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "run.pt"
    >>> _ = target.write_bytes(b"x")
    >>> set_aside(target).name, target.exists()
    ('run.pt.damaged', False)
    """
    aside, n = path.with_name(f"{path.name}.damaged"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged{n}")
    os.replace(path, aside)
    return aside
