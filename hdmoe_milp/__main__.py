"""``python -m hdmoe_milp``: the ``hdmoe-milp`` command, for environments without the console script."""

import sys

from .cli import main

sys.exit(main())
