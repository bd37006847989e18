"""``python -m gateway`` is the ``tunnelgate`` command."""

import sys

from gateway.cli import main

sys.exit(main())
