"""`python -m data_prep ...` runs the data-prep CLI."""

import sys

from data_prep.cli import main

sys.exit(main())
