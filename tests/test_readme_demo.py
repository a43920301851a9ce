"""The README's Quick start, verbatim, in a scratch clone (issue 14, must-show 1).

The commands are read from the README's Quick start block, so the test follows the README.
The clone is ``git clone`` of this repository (what is committed); its ``.venv`` is a
directory of links to this checkout's virtualenv with a fresh install stamp, so ``make``
finds the setup done and installs nothing (nothing is reinstalled or downloaded; the editable
install still points here, so ``PYTHONPATH`` puts the clone's own code first). The test
command runs with a small ``PYTEST_ARGS`` subset; ``SYNCTRAIN_SCRATCH_CLONE`` is set in the
clone, and this module skips itself there, so it never runs itself again.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUARD = "SYNCTRAIN_SCRATCH_CLONE"
#: The subset of the suite the README's test command runs in the clone (seconds, no Ray).
PYTEST_SUBSET = "tests/train/test_launch_units.py -q -k 'help or config_file or usage_errors'"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.skipif(bool(os.environ.get(GUARD)), reason="inside the scratch clone: not again"),
]


def quick_start_commands() -> list[str]:
    """The commands of the README's Quick start block, comments cut off."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S)
    assert block, "the README has no Quick start bash block"
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    return [c for c in commands if c]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    if shutil.which("git") is None or shutil.which("make") is None:
        pytest.skip("needs git and make")
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    venv = Path(sys.prefix)
    if not (venv / "pyvenv.cfg").is_file():
        pytest.skip("not running from a virtualenv to reuse")
    where = tmp_path_factory.mktemp("scratch") / "synctrain"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(where)], check=True, timeout=300)
    (where / ".venv").mkdir()
    for entry in venv.iterdir():  # the same packages, and a stamp newer than the clone's files
        if entry.name != ".synctrain-installed":
            (where / ".venv" / entry.name).symlink_to(entry)
    (where / ".venv" / ".synctrain-installed").touch()
    env = {**os.environ, GUARD: "1", "PYTHONPATH": str(where), "RAY_ADDRESS": "local",
           "SYNCTRAIN_STORAGE_PATH": str(where.parent / "results")}
    env.pop("VIRTUAL_ENV", None)
    imported = run(".venv/bin/python -c 'import synctrain; print(synctrain.__file__)'", where, env, 300)
    assert imported.stdout.strip() == str(where / "synctrain" / "__init__.py"), imported
    return where, env


def run(command: str, cwd: Path, env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout_s)


def test_the_readme_demo_command_trains_to_its_stated_accuracy(clone):
    where, env = clone
    demo = next(c for c in quick_start_commands() if "demo" in c)
    proc = run(demo, where, env, 900)
    assert proc.returncode == 0, (demo, proc.stdout[-3000:], proc.stderr[-3000:])
    assert "[setup]" not in proc.stdout and "pip install" not in proc.stdout  # nothing reinstalled
    accuracy = re.search(r"test accuracy (\d\.\d+)", proc.stdout)
    assert accuracy, proc.stdout[-3000:]
    assert float(accuracy.group(1)) >= 0.95  # the README says about 97%


def test_the_readme_test_command_runs_a_subset_in_the_clone(clone):
    where, env = clone
    test = next(c for c in quick_start_commands() if c.startswith("make test"))
    proc = run(f'{test} PYTEST_ARGS="{PYTEST_SUBSET}"', where, env, 600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 5, proc.stdout[-2000:]
