"""`python -m dsmoe SUBCOMMAND ...`: the `dsmoe` command without its script on PATH."""

import sys

from dsmoe.cli import main

sys.exit(main())
