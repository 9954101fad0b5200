"""The project's experiments, apart from the library: Fashion-MNIST (read from Debian's IDX files),
the suite's models and their training, the demo, the baselines and the comparison suite.

The library (``deepunlearn`` outside this package) imports nothing from here.
"""
from pathlib import Path

CACHE_DIR = Path.home() / ".cache" / "deepunlearn"  # trained checkpoints, kept between runs (--cache-dir)
SUITE_PER_CLASS = 100  # images per kept class the suite's unlearning calls get, as many to forget
