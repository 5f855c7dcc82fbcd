"""``python -m detectkit.cli`` (used by torchrun launch scripts) = the ``detectkit`` command."""

import sys

from detectkit.cli import main

sys.exit(main())
