#!/usr/bin/env python
"""`mixtral-ms-convert` in a checkout (`source scripts/env.sh` puts the package on the path): mixtral_ms/commands/convert.py."""
import sys

from mixtral_ms.commands.convert import main

if __name__ == "__main__":
    sys.exit(main())
