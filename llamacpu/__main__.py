"""`python -m llamacpu` runs the command line (llamacpu.cli)."""

import sys

from .cli import main

sys.exit(main())
