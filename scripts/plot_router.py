#!/usr/bin/env python
"""`mixtral-ms-plot-router` in a checkout (`source scripts/env.sh` puts the package on the path): mixtral_ms/commands/plot_router.py."""
import sys

from mixtral_ms.commands.plot_router import main

if __name__ == "__main__":
    sys.exit(main())
