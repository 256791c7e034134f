#!/usr/bin/env python
"""`mixtral-ms-tokenizer` in a checkout (`source scripts/env.sh` puts the package on the path): mixtral_ms/commands/tokenizer.py."""
import sys

from mixtral_ms.commands.tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
