"""`python -m specmoe_ext ...` is the `specmoe` command."""
import sys

from .cli import main

sys.exit(main())
