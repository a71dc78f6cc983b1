"""Makes the package importable when a harness runs as ``python benchmarks/<name>.py``."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
