"""Bad data directories give a one-line DataDirError naming the directory and the problem."""

from __future__ import annotations

import json
import os

import pytest

from kvtier.config import SSDTierConfig
from kvtier.errors import DataDirError
from kvtier.tiers.ssd import SSDTier
from kvtier.tiers.ssd.datadir import VERSION, VERSION_FILE


def open_tier(path) -> SSDTier:
    return SSDTier(SSDTierConfig(path=str(path), min_free_bytes=0))


def expect_error(path, *words: str) -> str:
    with pytest.raises(DataDirError) as info:
        open_tier(path).close()
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_absent_and_empty_directories_are_initialised(tmp_path):
    open_tier(tmp_path / "new" / "dir").close()
    info = json.loads((tmp_path / "new" / "dir" / VERSION_FILE).read_text())
    assert info == {"format": "kvtier-ssd", "version": VERSION}
    (tmp_path / "empty").mkdir()
    open_tier(tmp_path / "empty").close()
    open_tier(tmp_path / "empty").close()  # and reopened


def test_not_a_kvtier_directory(tmp_path):
    (tmp_path / "photos.jpg").write_bytes(b"\xff\xd8")
    expect_error(tmp_path, "not a kvtier data directory")
    assert sorted(os.listdir(tmp_path)) == ["photos.jpg"]  # nothing was changed


def test_foreign_or_garbled_version_file(tmp_path):
    (tmp_path / VERSION_FILE).write_text(json.dumps({"format": "other", "version": 1}))
    expect_error(tmp_path, "not a kvtier data directory")
    (tmp_path / VERSION_FILE).write_bytes(b"\x00\xff garbage")
    expect_error(tmp_path, "not a kvtier data directory")


def test_newer_format_version(tmp_path):
    open_tier(tmp_path).close()
    (tmp_path / VERSION_FILE).write_text(json.dumps({"format": "kvtier-ssd", "version": VERSION + 1}))
    expect_error(tmp_path, f"format version {VERSION + 1} is newer")


def test_path_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    expect_error(tmp_path / "f", "not a directory")


def test_unreadable(tmp_path):
    open_tier(tmp_path).close()
    if os.geteuid() == 0:  # root ignores permission bits: make the version file unreadable
        (tmp_path / VERSION_FILE).unlink()
        (tmp_path / VERSION_FILE).mkdir()
        expect_error(tmp_path, "unreadable")
    else:
        os.chmod(tmp_path, 0)
        try:
            expect_error(tmp_path, "unreadable")
        finally:
            os.chmod(tmp_path, 0o755)


def test_directory_in_use(tmp_path):
    with open_tier(tmp_path):
        expect_error(tmp_path, "in use by another process")


def test_garbled_index(tmp_path):
    open_tier(tmp_path).close()
    (tmp_path / "index" / "data.mdb").write_bytes(b"not an lmdb file" * 512)
    expect_error(tmp_path, "index unreadable")


def _make_unwritable(path) -> bool:
    """Make ``path`` refuse new entries: immutable for root (chattr +i), mode 0o555 otherwise."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return True
    import subprocess

    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


def _make_writable(path) -> None:
    if os.geteuid() == 0:
        import subprocess

        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    os.chmod(path, 0o755)


def test_unwritable_directory_says_unwritable(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    if not _make_unwritable(d):
        pytest.skip("cannot make a directory immutable here (chattr +i refused)")
    try:
        msg = expect_error(d, "unwritable")
        assert "unreadable" not in msg
        expect_error(d / "sub", "cannot be created")
    finally:
        _make_writable(d)


def test_a_directory_that_cannot_be_created_says_so(tmp_path):
    (tmp_path / "f").write_text("x")
    expect_error(tmp_path / "f" / "sub", "cannot be created")
