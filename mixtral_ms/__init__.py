"""mixtral-ms: Mixtral sparse mixture-of-experts as MindSpore Cells, registered with MindFormers.

Attributes load lazily so that light tools (the checkpoint converter) never import MindSpore;
importing `mixtral_ms.model.modeling` (or touching `MixtralForCausalLM`) registers the model with MindFormers.
"""
import os

from mixtral_ms.model.schema import ConfigError

# The checkout (pip install -e .): its configs/, data/ (bundled corpus and tokenizer) and scripts/.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = ["ConfigError", "MixtralConfig", "MixtralForCausalLM", "MixtralModel"]


def __getattr__(name: str):
    if name == "MixtralConfig":
        from mixtral_ms.model.configuration import MixtralConfig
        return MixtralConfig
    if name in ("MixtralForCausalLM", "MixtralModel"):
        from mixtral_ms.model import modeling
        return getattr(modeling, name)
    raise AttributeError(f"module 'mixtral_ms' has no attribute {name!r}")
