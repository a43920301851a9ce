"""Train a small MLP on scikit-learn's digits with 2 workers in async (parameter-server) mode.

    python examples/digits_async.py [--workers 2] [--epochs 15] [--staleness none|0|2|...] [--shards 2]
                                    [--kill-worker-at STEP]

The same training loop as ``digits_sync.py`` (``examples/digits.py``); only the Trainer's mode
changes. Starts a local Ray instance by itself (or joins the cluster in RAY_ADDRESS), and
prints the test accuracy (>= 93% expected) and the parameter server's counters.
``examples/digits.py`` with ``--mode async``: the same flags (``--help``), among them
``--kill-worker-at STEP`` to watch rank 1 die while rank 0 trains on.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(mode="async", doc=__doc__))
