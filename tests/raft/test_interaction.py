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
