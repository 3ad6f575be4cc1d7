"""`python -m prefixtune ...` runs the command line (so `torchrun ... -m prefixtune train` works)."""

import sys

from prefixtune.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
