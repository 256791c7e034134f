"""Pieces the benches share: running a CLI of this repo, and the bundled corpora's held-out splits."""
from __future__ import annotations

import os
import subprocess
import sys


from mixtral_ms.run.data import heldout_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELDOUT_FRACTION = 0.1  # every 10th chapter held out (scripts/preprocess_data.py --heldout_fraction)


def run(cmd, **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)


def split(corpus: str, output: str, heldout_output: str = None) -> str:
    """Tokenize data/<corpus> with its held-out split (skipped when both files exist); the held-out file."""
    heldout = heldout_output or heldout_path(output)
    if not (os.path.isfile(output) and os.path.isfile(heldout)):
        run([sys.executable, "scripts/preprocess_data.py", "--input", os.path.join("data", corpus), "--format",
             "text", "--seq_length", "128", "--output", output, "--heldout_fraction", str(HELDOUT_FRACTION),
             "--heldout_output", heldout, "--overwrite"])
    return heldout
