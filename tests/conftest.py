"""Shared pytest setup: tests import their plain-PyTorch oracles from this folder."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
