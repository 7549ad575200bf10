"""`python -m m2fp_client` runs the `m2fp` command line."""

import sys

from m2fp_client.cli import main

sys.exit(main())
