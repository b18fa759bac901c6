"""Atomic writes (``soar.atomic``): umask permissions, nothing partial or temporary left by a failure,
folders complete or absent, and the bytes of every writer the pipeline uses unchanged."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline.sample_layout import save_png
from soar import atomic


@pytest.fixture
def umask():
    """Set the process umask for one test: ``umask(0o077)``; the old one is restored afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def everything(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


IMAGE = (np.arange(8 * 8 * 3) % 251).astype(np.uint8).reshape(8, 8, 3)


def write_json(path: Path) -> None:
    with atomic.atomic_open(path, "w", encoding="utf-8") as f:
        json.dump({"a": 1}, f)


def write_torch(path: Path) -> None:
    with atomic.atomic_path(path) as tmp:
        torch.save({"x": torch.ones(2)}, tmp)


def write_safetensors(path: Path) -> None:  # save_file makes its own private file and renames it
    with atomic.atomic_path(path) as tmp:
        save_file({"x": torch.ones(2)}, tmp)


def write_pil(path: Path) -> None:
    with atomic.atomic_path(path) as tmp:
        Image.fromarray(IMAGE).save(tmp, format="PNG")


WRITERS = {
    "write_bytes": lambda p: atomic.write_bytes(p, b"data"),
    "write_text": lambda p: atomic.write_text(p, "text\n"),
    "json.dump": write_json,
    "torch.save": write_torch,
    "safetensors": write_safetensors,
    "PIL": write_pil,
    "sample_layout.save_png": lambda p: save_png(p, IMAGE),
}


@pytest.mark.parametrize("name", list(WRITERS))
@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_umask_permissions(umask, tmp_path, name, mask, expected):
    umask(mask)
    path = tmp_path / "sub" / "out.bin"
    WRITERS[name](path)
    assert mode(path) == expected, oct(mode(path))
    (tmp_path / "plain").write_bytes(b"")  # what an ordinary open() gives
    assert mode(tmp_path / "plain") == expected
    assert everything(tmp_path) == ["plain", "sub", "sub/out.bin"]  # no temporary file left


def test_sample_png_is_readable_by_group_and_others(umask, tmp_path):
    path = tmp_path / "00000" / "samples" / "0000.png"
    save_png(path, IMAGE)
    assert mode(path) & (stat.S_IRGRP | stat.S_IROTH) == stat.S_IRGRP | stat.S_IROTH
    assert np.array_equal(np.asarray(Image.open(path)), IMAGE)


def test_replacing_gives_the_new_bytes_and_mode(umask, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")
    path.chmod(0o600)
    atomic.write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and mode(path) == 0o644


class Boom(Exception):
    pass


def fail_after_writing(path: Path) -> None:
    with atomic.atomic_open(path, "wb") as f:
        f.write(b"partial")
        raise Boom


def fail_in_callback(path: Path) -> None:
    with atomic.atomic_path(path) as tmp:
        torch.save({"x": torch.ones(2)}, tmp)
        raise Boom


@pytest.mark.parametrize("fail", [fail_after_writing, fail_in_callback])
def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path, fail):
    path = tmp_path / "f.pt"
    path.write_bytes(b"old")
    with pytest.raises(Boom):
        fail(path)
    assert path.read_bytes() == b"old"
    assert everything(tmp_path) == ["f.pt"]
    with pytest.raises(Boom):
        fail(tmp_path / "new.pt")
    assert everything(tmp_path) == ["f.pt"]  # no partial target either


def test_a_failing_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    def broken_replace(src, dst):
        raise OSError("disk gone")

    path = tmp_path / "f"
    path.write_bytes(b"old")
    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    for write in WRITERS.values():
        with pytest.raises(OSError, match="disk gone"):
            write(path)
        assert path.read_bytes() == b"old"
        assert everything(tmp_path) == ["f"]


def test_atomic_open_refuses_reading_modes(tmp_path):
    with pytest.raises(ValueError, match="mode must start with 'w'"):
        with atomic.atomic_open(tmp_path / "f", "ab"):
            pass
    assert everything(tmp_path) == []


def test_torch_archive_holds_the_same_bytes_as_a_write_to_name_tmp(tmp_path):
    # torch.save records the file name (minus its last suffix) inside the archive
    obj = {"embeds": torch.arange(6.0).reshape(2, 3), "meta": json.dumps({"k": 1})}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with atomic.atomic_path(tmp_path / "a" / "cache.pt") as tmp:
        torch.save(obj, tmp)
    torch.save(obj, tmp_path / "b" / "cache.pt.tmp")
    assert (tmp_path / "a" / "cache.pt").read_bytes() == (tmp_path / "b" / "cache.pt.tmp").read_bytes()


def test_remove_temporaries_deletes_only_temporary_files(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "0000.png").write_bytes(b"png")
    (tmp_path / "s" / f"0001.png{atomic.TEMP_INFIX}1a2b").write_bytes(b"half")
    assert atomic.remove_temporaries(tmp_path) == 1
    assert everything(tmp_path) == ["s", "s/0000.png"]
    assert atomic.remove_temporaries(tmp_path / "absent") == 0


# --- folders -----------------------------------------------------------------------------------------

def fill(folder: Path, tag: str) -> None:
    (folder / "sub").mkdir()
    (folder / "sub" / "weights.bin").write_bytes(tag.encode() * 100)
    (folder / "config.json").write_text(tag)


def test_folder_appears_complete_with_umask_permissions(umask, tmp_path):
    final = tmp_path / "runs" / "step-1"
    with atomic.atomic_folder(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".")
        fill(tmp, "a")
        assert not final.exists()  # nothing at the final name until the end
    assert everything(final) == ["config.json", "sub", "sub/weights.bin"]
    assert everything(final.parent) == ["step-1", "step-1/config.json", "step-1/sub", "step-1/sub/weights.bin"]
    assert mode(final) == 0o755 and mode(final / "config.json") == 0o644
    umask(0o077)
    with atomic.atomic_folder(tmp_path / "private") as tmp:
        fill(tmp, "p")
    assert mode(tmp_path / "private") == 0o700


def test_folder_write_replaces_an_older_one(tmp_path):
    final = tmp_path / "step-1"
    with atomic.atomic_folder(final) as tmp:
        fill(tmp, "old")
    with atomic.atomic_folder(final) as tmp:
        (tmp / "only.txt").write_text("new")
    assert everything(tmp_path) == ["step-1", "step-1/only.txt"]


def test_failed_folder_write_leaves_the_old_folder_or_none(tmp_path):
    final = tmp_path / "step-1"
    with pytest.raises(Boom):
        with atomic.atomic_folder(final) as tmp:
            fill(tmp, "a")
            raise Boom
    assert everything(tmp_path) == []
    with atomic.atomic_folder(final) as tmp:
        fill(tmp, "old")
    with pytest.raises(Boom):
        with atomic.atomic_folder(final) as tmp:
            (tmp / "half").write_text("x")
            raise Boom
    assert everything(tmp_path) == ["step-1", "step-1/config.json", "step-1/sub", "step-1/sub/weights.bin"]
    assert (final / "config.json").read_text() == "old"


def test_failed_folder_rename_leaves_no_partial_folder(tmp_path, monkeypatch):
    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        with atomic.atomic_folder(tmp_path / "step-1") as tmp:
            fill(tmp, "a")
    assert everything(tmp_path) == []


def test_leftover_of_a_killed_folder_write_is_cleared(tmp_path):
    final = tmp_path / "step-1"
    (tmp_path / ".step-1.tmp").mkdir()
    (tmp_path / ".step-1.tmp" / "stale").write_text("x")
    with atomic.atomic_folder(final) as tmp:
        assert everything(tmp) == []
        (tmp / "fresh").write_text("y")
    assert everything(tmp_path) == ["step-1", "step-1/fresh"]
