"""lora_core.files.confine: which folders a graph may name, the owner's folders, regular-file reads, new-file writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_foundry.lora_core.files import confine
from lora_foundry.lora_core.files.confine import (
    ConfinementError,
    NotRegularFileError,
    Roots,
    create_new,
    is_within,
    make_folder_within,
    owner_folders,
    parse_allowed,
    read_text_capped,
    resolve_folder,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tree(tmp_path):
    """A server's folders (input, output, models/loras) and, beside them, an outside folder with a secret."""
    for sub in ("comfy/input/data", "comfy/output", "comfy/models/loras/sets", "outside/photos", "owner"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "outside" / "secret.txt").write_text("api key")
    return tmp_path


def roots_of(tree, owner=(), protected=()) -> Roots:
    c = tree / "comfy"
    return Roots.build(str(c / "input"), str(c / "output"), [str(c / "models" / "loras")], owner, protected)


def test_relative_folders_start_in_input_and_resolve_to_real_paths(tree):
    roots = roots_of(tree)
    assert resolve_folder("data", roots, "folder") == (tree / "comfy/input/data").resolve()
    assert resolve_folder(" 'data' ", roots, "folder") == (tree / "comfy/input/data").resolve()
    assert resolve_folder("data/../data", roots, "folder") == (tree / "comfy/input/data").resolve()
    assert resolve_folder(".", roots, "folder", write=True) == (tree / "comfy/input").resolve()


def test_absolute_folders_inside_roots_are_allowed_models_only_for_reading(tree):
    roots = roots_of(tree)
    out = tree / "comfy/output"
    assert resolve_folder(str(out), roots, "output_folder", write=True) == out.resolve()
    assert (
        resolve_folder(str(out / "new"), roots, "o", write=True, must_exist=False) == (out / "new").resolve()
    )
    sets = tree / "comfy/models/loras/sets"
    assert resolve_folder(str(sets), roots, "folder") == sets.resolve()
    with pytest.raises(ConfinementError, match="lets nodes write into"):
        resolve_folder(str(sets), roots, "output_folder", write=True)


@pytest.mark.parametrize("text", ["../outside/photos", "data/../../../outside/photos", "..", "/", "~"])
def test_dot_dot_and_outside_absolute_paths_are_refused(tree, text):
    with pytest.raises(ConfinementError) as e:
        resolve_folder(text, roots_of(tree), "source_folder")
    msg = str(e.value)
    assert msg.startswith(f"`source_folder` {text!r} is not inside a folder this server lets nodes read")
    assert "input folder" in msg and confine.ALLOWED_FILE in msg and confine.ENV_VAR in msg  # the fixes
    with pytest.raises(ConfinementError):
        resolve_folder(text, roots_of(tree), "source_folder", write=True, must_exist=False)


def test_same_message_for_existing_and_missing_outside_paths(tree):
    roots = roots_of(tree)
    messages = []
    for name in ("photos", "no_such_folder"):  # the first exists, the second does not
        text = str(tree / "outside" / name)
        for write in (False, True):
            with pytest.raises(ConfinementError) as e:
                resolve_folder(text, roots, "folder", write=write)
            messages.append((write, str(e.value).replace(repr(text), "<path>")))
    assert messages[0] == messages[2] and messages[1] == messages[3]
    assert (tree / "outside" / "photos").is_dir() and not (tree / "outside" / "no_such_folder").exists()


def test_symlink_leaving_input_is_refused_without_naming_its_target(tree):
    link = tree / "comfy/input/leak"
    link.symlink_to(tree / "outside")
    with pytest.raises(ConfinementError) as e:
        resolve_folder("leak", roots_of(tree), "folder")
    assert "'leak'" in str(e.value) and str(tree / "outside") not in str(e.value)
    with pytest.raises(ConfinementError):  # a new folder below the link would be created outside
        resolve_folder("leak/new", roots_of(tree), "output_folder", write=True, must_exist=False)


def test_symlink_inside_roots_is_followed(tree):
    (tree / "comfy/input/alias").symlink_to(tree / "comfy/output")
    assert resolve_folder("alias", roots_of(tree), "folder", write=True) == (tree / "comfy/output").resolve()


def test_symlinked_root_itself_works(tree):
    (tree / "input_link").symlink_to(tree / "comfy/input")
    roots = Roots.build(str(tree / "input_link"), str(tree / "comfy/output"))
    assert resolve_folder("data", roots, "folder") == (tree / "comfy/input/data").resolve()
    assert (
        resolve_folder(str(tree / "input_link" / "data"), roots, "folder")
        == (tree / "comfy/input/data").resolve()
    )


def test_missing_folder_inside_a_root_says_so(tree):
    with pytest.raises(
        NotADirectoryError, match=r"`folder` 'nope' is not a folder in ComfyUI's input folder"
    ):
        resolve_folder("nope", roots_of(tree), "folder")
    (tree / "comfy/input/file.png").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        resolve_folder("file.png", roots_of(tree), "folder")


@pytest.mark.parametrize(("text", "match"), [("", "is empty"), ("  ", "is empty"), ("a\0b", "NUL")])
def test_empty_and_nul_are_named_errors(tree, text, match):
    with pytest.raises(ValueError, match=f"`folder` .*{match}|`folder` {match}"):
        resolve_folder(text, roots_of(tree), "folder")


def test_is_within_compares_whole_components():
    assert is_within("/a/b", "/a/b") and is_within("/a/b/c", "/a/b") and is_within("/x", "/")
    assert not is_within("/a/bc", "/a/b") and not is_within("/a", "/a/b")


def test_owner_folders_from_environment_and_file(tree, monkeypatch):
    allowed = tree / "allowed_folders.txt"
    allowed.write_text(
        f"# datasets on the big disk\n\n  {tree / 'owner'}  \nrelative/one\n# {tree / 'outside'}\n"
    )
    env = {confine.ENV_VAR: os.pathsep.join([str(tree / "outside" / "photos"), "", "also_relative"])}
    found = owner_folders(env, allowed)
    assert found.folders == (str(tree / "outside" / "photos"), str(tree / "owner"))
    assert found.ignored == ("also_relative", "relative/one")
    roots = roots_of(tree, owner=found.folders)
    photos = tree / "outside" / "photos"
    assert resolve_folder(str(photos), roots, "folder", write=True) == photos.resolve()
    assert resolve_folder(str(tree / "owner"), roots, "folder") == (tree / "owner").resolve()
    with pytest.raises(ConfinementError):  # a commented-out line allows nothing
        resolve_folder(str(tree / "outside"), roots, "folder")
    assert owner_folders({}, tree / "missing.txt").folders == ()


def test_owner_file_parsing_and_home():
    assert parse_allowed("a\n #b\n\n c \r\n") == ["a", "c"]
    found = owner_folders({confine.ENV_VAR: "~/datasets"}, None)
    assert found.folders == (os.path.expanduser("~/datasets"),)


def test_protected_folder_is_never_written_even_inside_an_allowed_root(tree):
    pack = tree / "owner" / "pack"
    pack.mkdir()
    roots = roots_of(tree, owner=[str(tree / "owner")], protected=[str(pack)])
    assert resolve_folder(str(pack), roots, "folder") == pack.resolve()  # reading is fine
    for text in (str(pack), str(pack / "sub")):
        with pytest.raises(ConfinementError, match="lets nodes write into"):
            resolve_folder(text, roots, "output_folder", write=True, must_exist=False)
    assert resolve_folder(str(tree / "owner"), roots, "o", write=True) == (tree / "owner").resolve()


# --- reading --------------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "caption.txt"
    os.mkfifo(fifo)  # no writer: a plain open() for reading would block for ever
    with pytest.raises(NotRegularFileError):
        read_text_capped(fifo)
    with pytest.raises(NotRegularFileError):
        confine.open_regular(tmp_path)  # a folder is not a regular file either


def test_capped_read_cuts_and_drops_a_split_character(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("\ufeff".encode() + b"ab" + "é".encode() + b"cd")  # BOM, then a 2-byte character
    assert read_text_capped(path, limit=100) == confine.CappedText("abécd", False)
    cut = read_text_capped(path, limit=3 + 3)  # BOM (3) + "ab" + first byte of é
    assert cut == confine.CappedText("ab", True)
    path.write_bytes(b"x" * 70_000)
    big = read_text_capped(path)
    assert big.truncated and big.text == "x" * confine.CAPTION_LIMIT
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(UnicodeDecodeError):
        read_text_capped(path)


# --- writing --------------------------------------------------------------------------------------


def _fill(text):
    return lambda tmp: tmp.write_text(text)


@pytest.mark.parametrize("hard_links", [True, False])
def test_create_new_never_replaces_an_entry(tmp_path, monkeypatch, hard_links):
    if not hard_links:

        def no_link(*_args):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    create_new(tmp_path / "a.txt", _fill("new"))
    assert (tmp_path / "a.txt").read_text() == "new"
    (tmp_path / "mine.txt").write_text("user's")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "nowhere.txt")
    for name in ("a.txt", "mine.txt", "dangling.txt"):
        before = os.readlink(tmp_path / name) if name == "dangling.txt" else (tmp_path / name).read_text()
        with pytest.raises(FileExistsError):
            create_new(tmp_path / name, _fill("attacker"))
        after = os.readlink(tmp_path / name) if name == "dangling.txt" else (tmp_path / name).read_text()
        assert after == before
    assert not (tmp_path / "nowhere.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "dangling.txt", "mine.txt"]  # no temp left
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_create_new_removes_its_temp_file_when_the_writer_fails(tmp_path):
    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        create_new(tmp_path / "a.png", broken)
    assert list(tmp_path.iterdir()) == []


def test_make_folder_within_refuses_a_link_out_and_creates_nothing_there(tree):
    out = tree / "comfy/output/run"
    make_folder_within(out / "a" / "b", out)
    assert (out / "a" / "b").is_dir()
    (out / "escape").symlink_to(tree / "outside")
    with pytest.raises(ConfinementError, match="escape/deeper leads outside"):
        make_folder_within(out / "escape" / "deeper", out)
    assert sorted(p.name for p in (tree / "outside").iterdir()) == ["photos", "secret.txt"]


def test_confine_imports_no_comfy_module():
    script = (
        "import sys, types; sys.path = [p for p in sys.path if 'comfyui' not in p.lower()]\n"
        f"pkg = types.ModuleType('lora_foundry'); pkg.__path__ = [{str(REPO)!r}]; sys.modules['lora_foundry'] = pkg\n"
        "import lora_foundry.lora_core.files.confine\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'server', 'nodes')))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
