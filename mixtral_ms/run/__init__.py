"""A run from a MindFormers YAML: the one reader of run YAMLs (run_yaml.py), the value checks that need no
MindSpore (checks.py), registration and structure checks (yaml_check.py: importing it registers every piece
a YAML names), the runner, the train-one-step wrapper, callbacks, freezing, distillation, optimizers and
datasets. Importing this package imports nothing heavy."""
from mixtral_ms.cli import BadInput


class RunError(BadInput):
    """A run that cannot start: bad YAML, arguments, dataset or checkpoint; or one that stopped itself
    (diverged, a checkpoint it would not save)."""
