"""Atomic writes: a file or folder appears at its final path complete, or not at all.

Files: ``write_bytes`` / ``write_text``; ``atomic_open`` (a file object, e.g. for ``json.dump``) and
``atomic_path`` (a path, for writers that take one: ``torch.save``, ``safetensors`` ``save_file``,
``PIL.Image.save``). The data goes to a temporary file in the same folder, is flushed and fsync'd,
and the temporary file is renamed over the target (``os.replace``), then the folder is fsync'd where
the platform allows. The result has the permissions a plain ``open(path, "w")`` gives under the
process umask (``0o666 & ~umask``), also when the writer made its own private file. On any error
the temporary file is removed and the target is left as it was.

The temporary file is named ``{name}.tmp-{random hex}``: its name minus the last suffix is the final
name, which is what ``torch.save`` records inside its archive, so the bytes are those of a write to
``{name}.tmp``. A killed process can leave such files; ``remove_temporaries`` deletes them.

Folders: ``atomic_folder`` yields the hidden sibling ``.{name}.tmp`` to fill; on success everything
in it is fsync'd and it is renamed to the final name (replacing an older folder of that name, which
first moves aside to ``.{name}.old`` so the name never points at a half-deleted folder).
``fsync_tree``, ``replace_folder`` and ``remove_folder`` are its steps, for writers that need to do
something in between (e.g. a completion marker written after everything else is on disk).
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMP_INFIX = ".tmp-"
TEMP_GLOB = f"*{TEMP_INFIX}*"


def fsync_path(path: str | Path) -> None:
    """fsync a file or folder by name."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | Path) -> None:
    """fsync ``folder`` (its entries: a rename in it is durable), where the platform allows it."""
    try:
        fsync_path(folder)
    except OSError:  # e.g. Windows, or a filesystem that refuses fsync on folders
        pass


def _create_temp(path: Path) -> tuple[Path, int]:
    """Create a new, empty temporary file beside ``path`` as ``open`` would; returns it and its permission bits."""
    while True:
        tmp = path.with_name(f"{path.name}{TEMP_INFIX}{secrets.token_hex(6)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)


WRITING_NOTE = "while writing "  # start of the note an error inside an atomic write gets


def name_target(err: BaseException, target: Path) -> None:
    """Note on ``err`` the file or folder being written (a full disk or a writer's own error often names no
    path, or only a temporary one). Nested atomic writes each replace the note, so it ends up naming the
    outermost target: a final path the user knows, not a temporary folder inside it."""
    if not isinstance(err, Exception):
        return
    notes = [n for n in getattr(err, "__notes__", ()) if not n.startswith(WRITING_NOTE)]
    err.__notes__ = [*notes, f"{WRITING_NOTE}{target}"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write (by any means); on success it becomes ``path``.

    ``with atomic_path(out) as tmp: torch.save(obj, tmp)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _create_temp(path)
    try:
        yield tmp
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # the writer replaced the file with its own
            os.chmod(tmp, mode)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        name_target(err, path)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode, **kwargs)`` for writing, atomically: ``with atomic_open(p, "w") as f: json.dump(x, f)``."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes a new file: mode must start with 'w', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:  # closed (flushed) before the rename
        yield handle


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (as ``open(path, "w", encoding=encoding)`` would)."""
    with atomic_open(path, "w", encoding=encoding) as handle:
        handle.write(text)


def remove_temporaries(folder: str | Path) -> int:
    """Delete the temporary files killed writers left anywhere under ``folder``; returns how many."""
    folder = Path(folder)
    stale = [p for p in folder.rglob(TEMP_GLOB) if p.is_file()] if folder.is_dir() else []
    for p in stale:
        p.unlink()
    return len(stale)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file and folder under ``folder`` (each before the folder holding it), then ``folder``."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def remove_folder(folder: str | Path) -> None:
    """Remove ``folder`` so that its name vanishes at once: rename it to ``.{name}.old``, then delete that."""
    folder = Path(folder)
    trash = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash)


def replace_folder(tmp: str | Path, final: str | Path) -> None:
    """Rename the finished (fsync'd) folder ``tmp`` to ``final``, replacing a folder of that name; durable."""
    tmp, final = Path(tmp), Path(final)
    fsync_path(tmp)
    if final.exists():
        remove_folder(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


@contextmanager
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """Yield the empty hidden folder ``.{name}.tmp`` beside ``final`` to fill; on success it becomes ``final``.

    A leftover of a killed write is cleared first; on an error the temporary folder is removed and
    ``final`` (if any) is left as it was. The folder gets the permissions of ``os.mkdir`` under the umask.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        replace_folder(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        name_target(err, final)
        raise
