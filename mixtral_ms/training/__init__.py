"""Training pieces registered with MindFormers: the train-one-step wrapper and callbacks.

Importing this package runs mixtral_ms.training.yaml_check, which registers MixtralConfig,
MixtralModel, MixtralForCausalLM, MixtralTrainOneStepCell, MixtralProgressMonitor,
RouterStatsMonitor and MixtralCheckpointMonitor, so a YAML naming them builds through `mindformers.Trainer`.
"""
from .. import optim  # noqa: F401  (registers FusedAdamW and OffloadAdamW as optimizer types)
from .callbacks import MixtralCheckpointMonitor, MixtralProgressMonitor, RouterStatsMonitor
from .yaml_check import REGISTERED, check_config
from .wrapper import MixtralTrainOneStepCell

__all__ = ["MixtralCheckpointMonitor", "MixtralProgressMonitor", "MixtralTrainOneStepCell", "REGISTERED",
           "RouterStatsMonitor", "check_config"]
