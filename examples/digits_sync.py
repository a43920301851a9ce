"""Train a small MLP on scikit-learn's digits with 2 workers in sync (all-reduce) mode.

    python examples/digits_sync.py [--workers 2] [--epochs 15] [--kill-worker-at STEP]

Starts a local Ray instance by itself (or joins the cluster in RAY_ADDRESS), shows a progress
bar while it trains, and prints the test accuracy (>= 95% expected). ``examples/digits.py``
with ``--mode sync``: the same flags (``--help``), among them ``--kill-worker-at STEP`` to
watch rank 1 die and the job recover (e.g. ``--kill-worker-at 100``).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(mode="sync", doc=__doc__))
