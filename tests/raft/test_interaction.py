"""Runs every data-driven scenario in tests/raft/testdata/*.txt (etcd-io/raft style).

Each file states the paper section it checks in its opening comment. To regenerate the
expected traces after an intended behaviour change: ``REWRITE=1 pytest tests/raft/test_interaction.py``
and review the diff.
"""

from pathlib import Path

import pytest

from coordinator.testing.interaction import run_file

TESTDATA = Path(__file__).parent / "testdata"
FILES = sorted(TESTDATA.glob("*.txt"))


def test_testdata_present():
    assert len(FILES) >= 9, [f.name for f in FILES]


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_interaction(path):
    failures = run_file(path)
    assert not failures, "\n\n".join(failures)


def test_rewrite_mode_reproduces_the_file(tmp_path):
    """REWRITE=1 regenerates exactly the committed traces (the harness is deterministic)."""
    src = TESTDATA / "election.txt"
    copy = tmp_path / "election.txt"
    copy.write_text(src.read_text().replace("INFO node 1 added", "stale expectation"))
    assert run_file(copy, rewrite=False)  # the edit is detected ...
    run_file(copy, rewrite=True)
    assert copy.read_text() == src.read_text()  # ... and rewriting restores the file


def test_unknown_command_and_missing_separator_are_reported(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("add-nodes 1 voters=(1)\n")
    with pytest.raises(ValueError, match="not followed by '----'"):
        run_file(bad)
    bad.write_text("frobnicate 1\n----\nok\n")
    with pytest.raises(ValueError, match="unknown command"):
        run_file(bad)
