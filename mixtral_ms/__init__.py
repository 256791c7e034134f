"""mixtral-ms: Mixtral sparse mixture-of-experts as MindSpore Cells, registered with MindFormers."""
from .configuration import ConfigError, MixtralConfig
from .modeling import MixtralForCausalLM, MixtralModel

__all__ = ["ConfigError", "MixtralConfig", "MixtralForCausalLM", "MixtralModel"]
