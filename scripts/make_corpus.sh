#!/usr/bin/env bash
# Rebuilds the bundled corpora from Debian's public-domain KJV text (needs apt): one chapter per line,
# verse numbers and headings removed.
#   data/corpus/kjv_genesis_to_ruth.txt          domain A (the default pre-training corpus)
#   data/corpus_nt/kjv_matthew_to_revelation.txt  domain B (the New Testament)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v bible >/dev/null || apt-get install -y bible-kjv

reflow() {  # bible's verse-per-paragraph dump on stdin -> one chapter per line
    python3 -c '
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
'
}

bible "gen1:1-ruth4:22" | reflow > data/corpus/kjv_genesis_to_ruth.txt
mkdir -p data/corpus_nt
bible "matt1:1-rev22:21" | reflow > data/corpus_nt/kjv_matthew_to_revelation.txt
