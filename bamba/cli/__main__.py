"""``python -m bamba.cli ...``: the ``bamba`` command."""

import sys

from bamba.cli import main

sys.exit(main())
