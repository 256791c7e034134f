"""Parallel training, declared outside the model code: the layout and its validation (layout.py), the
semi-auto-parallel sharding plan and context (plan.py), the per-device memory estimate (memory.py).

Nothing here imports MindSpore at import time; `apply_plan`, `setup_context` and `prepare_parallel` import it
when called. The dry-run compile is a tool (mixtral_ms/tools/dryrun.py); launching and what runs on CPU vs
Ascend/GPU: docs/parallel.md.
"""
