"""``python -m diffguide``: the same as the ``diffguide`` command."""

import sys

from .cli import main

sys.exit(main())
