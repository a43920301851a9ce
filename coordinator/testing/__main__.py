"""``python -m coordinator.testing`` is the simulator's command line (see :mod:`.simulator`)."""

import sys

from .simulator import main

sys.exit(main())
