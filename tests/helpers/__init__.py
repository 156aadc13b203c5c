"""Helpers shared by the tests (the folder ``tests`` is on the path: ``from helpers import CONF``).

ROOT is the repository, CONF its Hydra config tree, EXPERIMENTS its study scripts.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
EXPERIMENTS = ROOT / "experiments"
