#!/usr/bin/env python
"""`mixtral-ms-experts` in a checkout (`source scripts/env.sh` puts the package on the path): mixtral_ms/commands/experts.py."""
import sys

from mixtral_ms.commands.experts import main

if __name__ == "__main__":
    sys.exit(main())
