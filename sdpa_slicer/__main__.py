"""``python -m sdpa_slicer``: the command line."""

from __future__ import annotations

import sys

from sdpa_slicer._tools.cli import main

sys.exit(main())
