"""The one atomic writer: all-or-nothing files, no clobbering, the umask's mode, and the sweep of
the pack's own stale temps (a real kill -9 mid-write) that never touches anyone else's file."""

import os
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch

from lora_foundry.lora_core.files import atomic
from lora_foundry.lora_core.files.atomic import STALE_AFTER_S, sweep_stale, temp_name, write_bytes, write_with
from lora_foundry.lora_core.files.savefile import save_lora

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OLD = time.time() - STALE_AFTER_S - 60


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def umask():
    """Sets a umask for one test and restores the previous one."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask):
        os.umask(mask)

    yield set_mask
    os.umask(saved)


def mode_of_new_file(folder, name="probe"):
    """The mode a plain open() gives a new file under the current umask: the expectation."""
    path = folder / name
    with open(path, "w"):
        pass
    mode = path.stat().st_mode & 0o777
    path.unlink()
    return mode


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_mode_follows_the_umask_for_bytes_and_safetensors(tmp_path, umask, mask):
    umask(mask)
    expected = mode_of_new_file(tmp_path)
    plain = write_bytes(tmp_path / "a.txt", b"hello")
    lora = save_lora(
        tmp_path / "m.safetensors", {"lora_unet_x": (torch.ones(4, 2), torch.ones(2, 3), 2.0)}, {}
    )
    assert plain.read_bytes() == b"hello"
    assert plain.stat().st_mode & 0o777 == expected
    # safetensors itself creates 0600 files: the merged/resized LoRAs used to come out -rw-------
    assert lora.stat().st_mode & 0o777 == expected
    assert hidden(tmp_path) == []


def test_no_overwrite_unless_asked_and_target_untouched(tmp_path):
    path = tmp_path / "keep.bin"
    path.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="keep.bin already exists and was left untouched"):
        write_bytes(path, b"new")
    assert path.read_bytes() == b"user data"
    write_bytes(path, b"new", overwrite=True)
    assert path.read_bytes() == b"new" and hidden(tmp_path) == []


def test_target_appearing_during_the_write_is_not_clobbered(tmp_path):
    path = tmp_path / "race.bin"

    def writer(tmp):
        tmp.write_bytes(b"ours")
        path.write_bytes(b"theirs")  # another writer wins the race after our existence check

    with pytest.raises(FileExistsError):
        write_with(path, writer)
    assert path.read_bytes() == b"theirs" and hidden(tmp_path) == []


def test_without_hard_links_still_refuses_existing(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError("links not supported here")

    monkeypatch.setattr(atomic.os, "link", no_links)
    write_bytes(tmp_path / "a.bin", b"1")
    assert (tmp_path / "a.bin").read_bytes() == b"1"
    with pytest.raises(FileExistsError):
        write_bytes(tmp_path / "a.bin", b"2")
    assert (tmp_path / "a.bin").read_bytes() == b"1" and hidden(tmp_path) == []


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_any_error_removes_the_temp_and_keeps_the_old_file(tmp_path, error):
    path = tmp_path / "old.bin"
    path.write_bytes(b"previous")

    def writer(tmp):
        tmp.write_bytes(b"half a fi")
        raise error

    with pytest.raises(type(error)):
        write_with(path, writer, overwrite=True)
    assert path.read_bytes() == b"previous" and hidden(tmp_path) == []


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        write_bytes(tmp_path / "nope" / "x.bin", b"")


def test_temp_overhead_is_what_the_writer_really_adds(tmp_path):
    seen = []

    def writer(tmp):
        seen.append(tmp.parent.name)
        tmp.write_bytes(b"x")

    write_with(tmp_path / "name.safetensors", writer)
    assert len(seen[0]) - len("name.safetensors") == atomic.TEMP_OVERHEAD
    assert len(temp_name("abc")) - 3 == atomic.TEMP_OVERHEAD


def _age(path, when=OLD):
    os.utime(path, (when, when), follow_symlinks=False)


def test_sweep_removes_only_the_packs_stale_temps(tmp_path):
    stale_dir = tmp_path / temp_name("merged.safetensors")
    stale_dir.mkdir()
    (stale_dir / "data").write_bytes(b"x" * 1000)
    (stale_dir / ".tmpAbC123").write_bytes(b"safetensors' own temp inside ours")
    for p in stale_dir.iterdir():
        _age(p)
    _age(stale_dir)
    legacy = tmp_path / ".run.trainstate.0123abcd.tmp"  # what earlier versions left
    legacy.write_bytes(b"x")
    _age(legacy)
    fresh = tmp_path / temp_name("busy.safetensors")  # another write, still going
    fresh.mkdir()
    (fresh / "data").write_bytes(b"x")
    _age(fresh)  # the folder looks old, but its file is being written now
    keep = {
        "user.tmp": "file",
        ".notes.tmp": "file",
        ".tmpAbC123": "file",  # not our name, whoever made it
        ".x.safetensors.lora_foundry-0123456789ab.tmp": "file",  # our pattern, but a file: not ours
        ".x.txt.0123abcd.tmp": "file",  # the old pattern, but not a file the pack wrote
        ".y.safetensors.0123abcd.tmp": "dir",  # the old pattern is for files only
        "my.safetensors": "file",
    }
    for name, kind in keep.items():
        (tmp_path / name).mkdir() if kind == "dir" else (tmp_path / name).write_bytes(b"mine")
        _age(tmp_path / name)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data").write_bytes(b"precious")
    link = tmp_path / temp_name("linked.safetensors")
    link.symlink_to(outside, target_is_directory=True)
    _age(link)

    removed = sweep_stale(tmp_path)

    assert sorted(removed) == sorted([stale_dir.name, legacy.name])
    assert not stale_dir.exists() and not legacy.exists()
    assert fresh.exists() and all((tmp_path / n).exists() for n in keep)
    assert link.is_symlink() and (outside / "data").read_bytes() == b"precious"


def test_next_write_sweeps_the_folder_it_writes_to(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for folder in (tmp_path, other):
        stale = folder / temp_name("a.safetensors")
        stale.mkdir()
        (stale / "data").write_bytes(b"x")
        _age(stale / "data")
        _age(stale)
    write_bytes(tmp_path / "b.bin", b"1")
    assert hidden(tmp_path) == [] and len(hidden(other)) == 1


KILLED_WRITER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import conftest  # the pack importable as lora_foundry
from lora_foundry.lora_core.files.atomic import write_with

def writer(tmp):
    with open(tmp, "wb") as handle:
        handle.write(b"x" * 1_000_000)
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)

write_with({target!r}, writer)
"""


@pytest.mark.timeout(60)
def test_kill_9_mid_write_leaves_debris_that_the_next_write_removes(tmp_path):
    target = tmp_path / "merged.safetensors"
    code = KILLED_WRITER.format(tests=os.path.join(REPO, "tests"), target=str(target))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=50)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    debris = hidden(tmp_path)
    assert len(debris) == 1 and not target.exists()
    assert sweep_stale(tmp_path) == []  # young debris might be a live write: kept
    for p in (tmp_path / debris[0]).iterdir():
        _age(p)
    _age(tmp_path / debris[0])
    save_lora(target, {"lora_unet_x": (torch.ones(4, 2), torch.ones(2, 3), 2.0)}, {})
    assert hidden(tmp_path) == []
    assert set(safetensors.torch.load_file(str(target))) == {
        "lora_unet_x.lora_up.weight",
        "lora_unet_x.lora_down.weight",
        "lora_unet_x.alpha",
    }
