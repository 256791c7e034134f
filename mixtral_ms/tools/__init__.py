"""Tools over checkpoints and runs: expert surgery (surgery.py), compression (compress/), held-out evaluation
(evaluate.py) and the parallel dry-run compile (dryrun.py, with its stand-in CANN, cann_stub.py)."""
