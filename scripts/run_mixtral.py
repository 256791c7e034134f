#!/usr/bin/env python
"""`mixtral-ms-run` in a checkout (`source scripts/env.sh` puts the package on the path): mixtral_ms/commands/run.py."""
import sys

from mixtral_ms.commands.run import main

if __name__ == "__main__":
    sys.exit(main())
