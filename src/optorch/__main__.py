"""``python -m optorch`` runs the command line (see :mod:`optorch.cli`)."""

import sys

from optorch.cli import main

sys.exit(main())
