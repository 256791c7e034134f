#!/usr/bin/env python
"""`mixtral-ms-compress` in a checkout (`source scripts/env.sh` puts the package on the path): mixtral_ms/commands/compress.py."""
import sys

from mixtral_ms.commands.compress import main

if __name__ == "__main__":
    sys.exit(main())
