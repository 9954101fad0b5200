"""``python -m deepunlearn``: the same command line as the ``deepunlearn`` console script."""
import sys

from .cli import main

sys.exit(main())
