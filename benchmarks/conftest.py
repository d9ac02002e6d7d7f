"""Benchmarks import their inputs and references from the tests' helpers (tests/ops/helpers.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
