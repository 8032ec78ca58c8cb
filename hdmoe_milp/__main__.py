"""``python -m hdmoe_milp``: the ``hdmoe-milp`` command, for environments without the console script."""

import sys

from ._console import main

sys.exit(main())
