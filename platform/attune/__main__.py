"""`python -m attune ...` is the `attune` command (what Ray jobs run where attune is not installed)."""

import sys

from attune.cli import main

sys.exit(main())
