"""The project's experiments, apart from the library: Fashion-MNIST (read from Debian's IDX files),
the suite's models and their training, the demo, the baselines and the comparison suite.

The library (``deepunlearn`` outside this package) imports nothing from here.
"""
