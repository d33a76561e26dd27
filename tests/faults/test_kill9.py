"""kill -9 mid-write, 24 seeded trials (see `tests.faults.kill9`; ``python -m tests.faults.report`` runs more)."""

from __future__ import annotations

import sys

import pytest

from tests.faults import kill9

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL trials and flock sweeping: Linux")


def test_a_killed_prefill_loses_nothing_and_leaves_nothing_to_clean(tmp_path, record_property):
    figures = kill9.run(tmp_path, trials=24, seed=0)
    record_property("kill9", figures.as_dict())
    print(figures.as_dict())
    for r in figures.results:
        where = f"trial {r.plan}"
        assert r.correct, f"{where}: a greedy answer from the folder differs from the cold run's"
        assert r.damaged_pages == 0, f"{where}: a page file on disk differs from the uninterrupted run's"
        assert r.lost_pages == 0, f"{where}: an acknowledged page is gone after the kill"
        assert r.reused_tokens == r.expected_reuse, f"{where}: pages on disk were not reused"
        assert not r.temp_reads, f"{where}: temporary files were read: {r.temp_reads}"
        assert r.temps_left == 0 and r.final_pages_ok, f"{where}: the folder was not left as a clean run leaves it"
        if r.plan.mode != "timed":
            assert r.stalled_at is not None, f"{where}: the aimed kill did not land in the page-write path"
    assert figures.modes == {"timed": 12, "mid-write": 4, "before-rename": 4, "after-rename": 4}
    # the aimed kills leave a temporary file behind (except after the rename): what the sweep must handle
    assert figures.kills_inside_page_writes >= 8
    assert figures.kills_during_run >= 18 and figures.pages_reused > 0
