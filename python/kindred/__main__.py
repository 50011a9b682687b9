"""``python -m kindred ...`` is the ``kindred`` command."""

import sys

from .cli import main

sys.exit(main())
