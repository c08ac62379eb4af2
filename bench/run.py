"""The bench's single entry point (`make bench` runs it), so one command measures layerlb against HAProxy,
nginx direct and the kernel path; see bench/README.md and `bench/run.py --help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script (`python bench/run.py`): make the repository importable, for the `bench` package.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    from bench import harness

    sys.exit(harness.main())
