"""checkpoint.paths: tracker reading, directory replacement, source/destination path rules."""

from __future__ import annotations

import os

import pytest

from megatron_grow.checkpoint import paths
from megatron_grow.errors import CheckpointError


def _root_with_iteration(tmp_path, iteration=5):
    root = tmp_path / "run"
    (root / f"iter_{iteration:07d}").mkdir(parents=True)
    return root


def test_binary_tracker_is_a_checkpoint_error(tmp_path):
    root = _root_with_iteration(tmp_path)
    (root / paths.TRACKER_FILENAME).write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match="not a text file") as e:
        paths.read_tracker(str(root))
    assert paths.TRACKER_FILENAME in str(e.value) and "\n" not in str(e.value)


def test_text_tracker_still_reads(tmp_path):
    root = _root_with_iteration(tmp_path)
    (root / paths.TRACKER_FILENAME).write_text("5\n")
    assert paths.read_tracker(str(root)) == 5


def _tree(path, marker):
    os.makedirs(path)
    with open(os.path.join(path, "marker"), "w") as f:
        f.write(marker)


def _marker(path):
    with open(os.path.join(path, "marker")) as f:
        return f.read()


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_dir_swaps_in_new_and_removes_old(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(paths, "exchange_paths", lambda a, b: False)
    new, dest = str(tmp_path / "new"), str(tmp_path / "dest")
    _tree(dest, "old")
    _tree(new, "new")
    paths.replace_dir(new, dest)
    assert _marker(dest) == "new"
    assert sorted(os.listdir(tmp_path)) == ["dest"]


def test_exchange_paths_is_atomic_swap(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _tree(a, "A")
    _tree(b, "B")
    if not paths.exchange_paths(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this platform/filesystem")
    assert (_marker(a), _marker(b)) == ("B", "A")


def test_recover_retired_puts_old_copy_back(tmp_path):
    dest = str(tmp_path / "dest")
    _tree(dest + paths.RETIRED_MARK + "abcd", "old")
    paths.recover_retired(dest)
    assert _marker(dest) == "old" and sorted(os.listdir(tmp_path)) == ["dest"]
    _tree(dest + paths.RETIRED_MARK + "ef01", "older")  # dest exists: the retired copy is dropped
    paths.recover_retired(dest)
    assert _marker(dest) == "old" and sorted(os.listdir(tmp_path)) == ["dest"]


def test_same_or_nested_resolves_links(tmp_path):
    src = tmp_path / "p" / "src"
    src.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(src)
    assert paths.same_or_nested(str(link), str(src))
    assert paths.same_or_nested(str(tmp_path / "p"), str(src))        # DST contains SRC
    assert paths.same_or_nested(str(src / "grown"), str(src))         # DST inside SRC
    assert paths.same_or_nested(str(tmp_path / "p" / "." / "src"), str(src))
    assert not paths.same_or_nested(str(tmp_path / "p" / "src2"), str(src))  # a prefix is not a parent


def test_probe_writable_refuses_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        if os.access(str(ro), os.W_OK) and os.geteuid() == 0:
            pytest.skip("running as root: permissions do not stop writes (the read-only mount case is "
                        "tested in tests/distributed/test_grow_bad_input.py)")
        with pytest.raises(CheckpointError, match="not writable"):
            paths.probe_writable(str(ro / "dst"), "--save")
    finally:
        os.chmod(ro, 0o755)
    paths.probe_writable(str(tmp_path / "new" / "dst"), "--save")  # a missing dir under a writable one
    assert sorted(os.listdir(tmp_path)) == ["ro"]  # the probe leaves nothing behind
