#!/usr/bin/env python
"""`mixtral-ms-dryrun` in a checkout (`source scripts/env.sh` puts the package on the path): mixtral_ms/commands/dryrun.py."""
import sys

from mixtral_ms.commands.dryrun import main

if __name__ == "__main__":
    sys.exit(main())
