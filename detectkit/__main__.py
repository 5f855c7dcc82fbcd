"""``python -m detectkit`` = the ``detectkit`` command."""

import sys

from detectkit.cli import main

sys.exit(main())
