#!/usr/bin/env bash
# Rebuilds data/corpus/kjv_genesis_to_ruth.txt from Debian's public-domain KJV text (needs apt).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v bible >/dev/null || apt-get install -y bible-kjv
bible "gen1:1-ruth4:22" | python3 -c '
import re, sys
docs, cur = [], []
for line in sys.stdin:
    if re.match(r"^[1-3]?\s?[A-Z][a-z]+( of [A-Z][a-z]+)? \d+$", line.strip()):  # "Genesis 1": a new chapter
        if cur:
            docs.append(" ".join(cur))
            cur = []
        continue
    text = re.sub(r"^\s*\d+\s+", "", line).strip()  # drop verse numbers
    if text:
        cur.append(text)
docs.append(" ".join(cur))
print("\n".join(re.sub(r"\s+", " ", d) for d in docs))
' > data/corpus/kjv_genesis_to_ruth.txt
