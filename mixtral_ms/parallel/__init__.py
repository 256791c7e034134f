"""Parallel training for mixtral-ms, outside the model code: layout validation (config.py), the
semi-auto-parallel sharding plan and context (plan.py) and the per-device memory estimate (memory.py).

Nothing here imports MindSpore at import time; `apply_plan`, `setup_context` and `prepare_parallel`
import it when called. Launching and the verified-on-CPU vs needs-Ascend/GPU split: docs/parallel.md.
"""
from ..schema import ModelDims, model_dims
from .config import ParallelConfigError, ParallelLayout, from_run_config, load_yaml, validate
from .plan import Entry, apply_plan, check_table, context_kwargs, plan_spec, prepare_parallel, setup_context

__all__ = ["Entry", "ModelDims", "ParallelConfigError", "ParallelLayout", "apply_plan", "check_table",
           "context_kwargs", "from_run_config", "load_yaml", "model_dims", "plan_spec", "prepare_parallel",
           "setup_context", "validate"]
