#!/usr/bin/env python
"""`mixtral-ms-preprocess` in a checkout (`source scripts/env.sh` puts the package on the path): mixtral_ms/commands/preprocess.py."""
import sys

from mixtral_ms.commands.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
