"""`python -m puregen.cli`: the same command as the `puregen` console script."""

import sys

from . import main

sys.exit(main())
