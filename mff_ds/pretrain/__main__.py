"""`python -m mff_ds.pretrain`: the stop-signal handlers go in before torch is imported, so SIGUSR1/SIGTERM/SIGINT
during start-up save at the first check instead of killing the process."""
import sys

from mff_ds.engine import signals

signals.catch()

from mff_ds.pretrain.cli import main  # noqa: E402

sys.exit(main())
