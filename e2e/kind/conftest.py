"""The kind suite runs only in kind mode: `e2e/kind/run.sh` sets LAYERLB_KIND_CLUSTER after it built the
image, created the cluster and installed the chart. In every other run (`make test`, plain `pytest`)
`test_kind.py` is not collected at all, so it neither runs nor shows up as skipped; the checks of this
folder that need no Docker (`test_kind_files.py`) always run."""

from __future__ import annotations

import os

MODE_ENV = "LAYERLB_KIND_CLUSTER"
collect_ignore = [] if os.environ.get(MODE_ENV) else ["test_kind.py"]
