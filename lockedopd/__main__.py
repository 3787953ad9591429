"""``python -m lockedopd`` runs the CLI."""

import sys

from lockedopd.cli import main

sys.exit(main())
