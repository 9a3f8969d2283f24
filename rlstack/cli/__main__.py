"""`python -m rlstack.cli`: the `rlstack` command."""

import sys

from rlstack.cli import main

sys.exit(main())
