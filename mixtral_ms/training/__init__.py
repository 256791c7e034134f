"""Training pieces registered with MindFormers: the train-one-step wrapper and callbacks.

Importing this package also imports the model, so a YAML naming MixtralConfig / MixtralForCausalLM,
MixtralTrainOneStepCell, MixtralProgressMonitor or RouterStatsMonitor builds through MindFormers.
"""
from .. import modeling  # noqa: F401  (registers MixtralConfig, MixtralModel, MixtralForCausalLM)
from .callbacks import MixtralProgressMonitor, RouterStatsMonitor
from .wrapper import MixtralTrainOneStepCell

__all__ = ["MixtralProgressMonitor", "MixtralTrainOneStepCell", "RouterStatsMonitor"]
