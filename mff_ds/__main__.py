"""`python -m mff_ds COMMAND ...`: the `mff-ds` command (mff_ds/cli.py)."""
import sys

from mff_ds.cli import main

sys.exit(main())
