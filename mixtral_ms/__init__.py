"""mixtral-ms: Mixtral sparse mixture-of-experts as MindSpore Cells, registered with MindFormers.

Attributes load lazily so that light tools (the checkpoint converter) never import MindSpore;
importing `mixtral_ms.modeling` (or touching `MixtralForCausalLM`) registers the model with MindFormers.
"""
from .schema import ConfigError

__all__ = ["ConfigError", "MixtralConfig", "MixtralForCausalLM", "MixtralModel"]


def __getattr__(name: str):
    if name == "MixtralConfig":
        from .configuration import MixtralConfig
        return MixtralConfig
    if name in ("MixtralForCausalLM", "MixtralModel"):
        from . import modeling
        return getattr(modeling, name)
    raise AttributeError(f"module 'mixtral_ms' has no attribute {name!r}")
