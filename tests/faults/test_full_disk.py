"""A really full disk under the prefix cache and the offload spill folder (see `tests.faults.fullfs`)."""

from __future__ import annotations

import sys

import pytest

from tests.faults import fullfs

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="tmpfs and RLIMIT_FSIZE: Linux")


def _check(f: fullfs.FullDiskFigures) -> None:
    assert f.wrong_answers == 0 and f.answers_checked >= 7
    assert f.partial_pages == 0 and f.temporary_files_left == 0
    assert f.warnings_while_full == 1, "one warning for the whole process, however many pages fail"
    hint = "(the disk is full)" if f.filesystem == "tmpfs" else "(the file size limit is reached)"
    assert hint in f.full_warning and "REATTENTION_CACHE_DIR" in f.full_warning
    assert f.pages_restored_after_space_returned == f.pages_written_until_full
    assert f.complete_after_space_returned
    assert "could not reserve" in f.spill_error and "Free disk space there" in f.spill_error
    assert f.spill_files_left == 0 and f.spill_answer_after_space_returned_ok


def test_a_full_disk_loses_nothing(tmp_path, record_property):
    """On a small tmpfs where mounting works (root), else with RLIMIT_FSIZE; the figures say which ran."""
    figures = fullfs.run(tmp_path)
    record_property("full_disk", figures.as_dict())
    print(figures.as_dict())
    _check(figures)
    if figures.filesystem == "tmpfs":
        assert 0 < figures.pages_written_until_full <= fullfs.ROOM_PAGES + 1
        assert figures.read_only_answers_ok and figures.read_only_warnings == 1


def test_the_rlimit_fallback_works_where_mounting_does(tmp_path, monkeypatch):
    """The fallback is what runs where mounting is refused: keep it working on machines that can mount."""
    monkeypatch.setenv(fullfs.ENV_NO_MOUNT, "1")
    figures = fullfs.run(tmp_path)
    assert figures.filesystem == "rlimit" and figures.pages_written_until_full == 0
    _check(figures)
