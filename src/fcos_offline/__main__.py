"""``python -m fcos_offline`` runs the CLI."""

import sys

from fcos_offline.cli import main

sys.exit(main())
