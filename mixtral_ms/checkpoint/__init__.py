"""Checkpoints on disk: safetensors I/O (safetensors_io.py), parameter names, `parse(name)` and the Hugging
Face map (name_map.py), a checkpoint seen as a Mixtral (view.py), streaming conversion and the one folder
writer (convert.py), loading into a model (load.py) and a cluster run's per-rank checkpoints
(distributed.py). Everything but load.py is numpy only."""
