"""Issue 26, section 4: every command, fed each kind of bad input, answers one line and an exit code.

The commands and their arguments come from the parser itself (``deepfeat.cli.build_parser``),
so a command added tomorrow is walked the day it is added: each of its positional arguments
and required options gets each bad value in turn. The answer must be the documented one:
exit 1 (a bad file) or 2 (a bad usage), one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepfeat import cli
from deepfeat.errors import DeepfeatError

#: arguments that are not files: a bad *file* value makes no sense for them (choices, counts, names)
NOT_FILES = {("visualize", "kind")}


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def file_arguments(name: str, sp: argparse.ArgumentParser) -> list[argparse.Action]:
    """The positionals and required options of a command: where a user puts paths."""
    return [a for a in sp._actions if (not a.option_strings or a.required) and a.dest != "help"
            and (name, a.dest) not in NOT_FILES]


@pytest.fixture()
def bad(tmp_path_factory) -> dict[str, str]:
    """One value per kind of bad input, fresh for each test (a command may legitimately write into
    one: `extract -o FOLDER` makes the empty folder a store, which `serve` would then serve)."""
    d = tmp_path_factory.mktemp("bad")
    (d / "folder").mkdir()
    (d / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    (d / "empty.txt").write_bytes(b"")
    Image.new("RGB", (32, 32), "red").save(d / "photo.jpg")
    for name, meta in (("meta-list", [1, 2]), ("meta-null", None),
                       ("meta-dim", {"format": "deepfeat-store", "features": {"x": {"dim": "wide"}}})):
        (d / name).mkdir()
        (d / name / "meta.json").write_text(json.dumps(meta))
    (d / "bom.txt").write_bytes("\ufeffall_souls_1 x\n".encode("utf-8"))
    np.save(d / "objects.npy", np.array([{"a": 1}, "x"], dtype=object), allow_pickle=True)
    return {
        "missing": str(d / "does-not-exist"),
        "folder": str(d / "folder"),
        "garbage": str(d / "garbage.jpg"),
        "empty": str(d / "empty.txt"),
        "jpeg-as-list": "@" + str(d / "photo.jpg"),
        "meta-list": str(d / "meta-list"),
        "meta-null": str(d / "meta-null"),
        "meta-dim": str(d / "meta-dim"),
        "bom": str(d / "bom.txt"),
        "npy-objects": str(d / "objects.npy"),
        "missing-folder-out": str(d / "no-such-dir" / "out.npz"),
    }


CASES = [(name, action.dest, kind) for name, sp in commands().items() for action in file_arguments(name, sp)
         for kind in ("missing", "folder", "garbage", "empty", "jpeg-as-list", "meta-list", "meta-null", "meta-dim",
                      "bom", "npy-objects", "missing-folder-out")]


def argv_for(name: str, dest: str, value: str, tmp: Path) -> list[str]:
    """A command line whose argument *dest* is *value* and whose other file arguments are plain,
    harmless values (a fresh folder for outputs, an existing image for inputs)."""
    sp = commands()[name]
    argv = [name]
    photo = tmp / "ok.jpg"
    if not photo.exists():
        Image.new("RGB", (40, 30), "blue").save(photo)
    for a in file_arguments(name, sp):
        v = value if a.dest == dest else (str(tmp / f"out-{a.dest}") if a.option_strings else str(photo))
        if a.option_strings:
            argv += [a.option_strings[0], v]
        else:
            argv.append(v)
    if name == "visualize":
        argv.insert(1, "activations")
    return argv


@pytest.mark.parametrize("name, dest, kind", CASES, ids=[f"{c}-{d}-{k}" for c, d, k in CASES])
def test_every_command_answers_bad_input_in_one_line(name, dest, kind, bad, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a value taken as a relative output path ("@/...") lands here
    argv = argv_for(name, dest, bad[kind], tmp_path)
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse: a usage error (2) with its usage line
        rc = e.code
        assert rc == 2, argv
        return
    err = capsys.readouterr().err
    assert rc in (0, 1, 2), (argv, rc, err)  # 0: a value this argument accepts (a folder to write into...)
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("WARNING", "INFO"))]
    errors = [ln for ln in lines if ln.startswith(f"deepfeat {name}: error: ")]
    if errors:  # an error is one line, alone (a report like check-images' is the command's own output)
        assert lines == errors and len(errors) == 1, (argv, err)


def test_the_walk_covers_every_command():
    walked = {c for c, _, _ in CASES}
    without_files = {n for n, sp in commands().items() if not file_arguments(n, sp)}
    assert walked | without_files == set(commands())
    assert {"extract", "search", "serve", "export", "info", "eval", "compute-ap"} <= walked


@pytest.mark.parametrize("error", [OSError(28, "No space left on device", "STORE/meta.json"),
                                   PermissionError(13, "Permission denied", "STORE/index"),
                                   MemoryError("cannot allocate 600 GB"),
                                   IsADirectoryError(21, "Is a directory", "gt")])
def test_the_boundary_turns_expected_failures_into_one_line(error, capsys):
    def boom(args):
        raise error

    args = argparse.Namespace(func=boom, command="x")
    rc = cli.dispatch(args)
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("deepfeat x: error: ")
    assert isinstance(DeepfeatError("x"), Exception)


# -- the cases of the issue, each through the real CLI -------------------------------------------

@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    from deepfeat.data.samples import write_sample_photos

    d = tmp_path_factory.mktemp("small")
    write_sample_photos(d / "img")
    assert cli.main(["extract", str(d / "img"), "-o", str(d / "store"), "--workers", "0", "--progress", "none"]) == 0
    return d / "store"


def _one_error(capsys, name: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"deepfeat {name}: error: "), err
    return err


def test_export_into_a_missing_folder_names_the_folder(small_store, tmp_path, capsys):
    assert cli.main(["export", str(small_store), "-o", str(tmp_path / "nodir" / "x.npz")]) == 2
    assert "the folder" in _one_error(capsys, "export") and not (tmp_path / "nodir").exists()


@pytest.mark.parametrize("array", [np.array(["a", "b"]), np.array([{"a": 1}], dtype=object)])
def test_a_npy_query_of_strings_or_objects(small_store, tmp_path, capsys, array):
    np.save(tmp_path / "q.npy", array, allow_pickle=True)
    assert cli.main(["search", str(small_store), str(tmp_path / "q.npy")]) == 2
    assert "does not hold numeric vectors" in _one_error(capsys, "search")


def test_an_index_meta_naming_an_absolute_file(small_store, tmp_path, capsys):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(small_store, store)
    assert cli.main(["index", str(store), "--kind", "flat"]) == 0
    capsys.readouterr()
    meta = json.loads((store / "index/index.json").read_text())
    meta["index_file"] = "/etc/passwd"
    meta.pop("meta_sha256")  # as an index saved before metas recorded their own sha256
    (store / "index/index.json").write_text(json.dumps(meta))
    assert cli.main(["search", str(store), "0"]) == 1
    assert "index_file must be the name of a file beside it" in _one_error(capsys, "search")


def test_a_size_no_image_can_have_is_refused_before_extracting(tmp_path, capsys):
    assert cli.main(["extract", str(tmp_path), "-o", str(tmp_path / "s"), "--size", "long:100000"]) == 2
    assert "at most long:13377" in _one_error(capsys, "extract") and not (tmp_path / "s").exists()


def test_compute_ap_given_a_folder_and_a_byte_order_mark(tmp_path, capsys):
    assert cli.main(["compute-ap", str(tmp_path), str(tmp_path)]) == 2
    assert "is a folder" in _one_error(capsys, "compute-ap")
    for kind, names in (("good", ["a"]), ("ok", []), ("junk", [])):
        (tmp_path / f"q_{kind}.txt").write_text("".join(n + "\n" for n in names))
    (tmp_path / "ranked.txt").write_bytes("\ufeffa\nb\n".encode())  # a Windows editor's BOM
    assert cli.main(["compute-ap", str(tmp_path / "q"), str(tmp_path / "ranked.txt")]) == 0
    assert float(capsys.readouterr().out) == 1.0  # "a" found at rank 1: the BOM is not part of its name


def test_an_oxford_query_file_with_a_byte_order_mark(tmp_path):
    from deepfeat.evaluate.loaders import _parse_oxford_query

    q = tmp_path / "all_souls_1_query.txt"
    q.write_bytes("\ufeffoxc1_all_souls_000013 136.5 34.1 648.5 955.7\n".encode())
    assert _parse_oxford_query(q) == ("oxc1_all_souls_000013", (136.5, 34.1, 648.5, 955.7))


def test_a_jpeg_given_as_a_list(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    assert cli.main(["check-images", "@" + str(tmp_path / "a.jpg")]) == 2
    assert "give it without the @" in _one_error(capsys, "check-images")
