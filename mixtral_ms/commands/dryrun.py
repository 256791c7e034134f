"""Compile a parallel layout's training (or predict) graph on a CPU-only host, as one rank of the cluster
would, with MindSpore's own parallel compiler (DryRun, a stand-in CANN built on first use; needs gcc):

  python scripts/dryrun.py --config configs/parallel/mixtral_8x7b_pretrain_32p.yaml --all-stages --layers 4
  python scripts/dryrun.py --config configs/parallel/mixtral_8x7b_pretrain_8p.yaml --rank 3
  python scripts/dryrun.py --config configs/parallel/dryrun/mixtral_tiny_8p.yaml --set parallel_config.expert_parallel=4
  python scripts/dryrun.py --matrix              # the tiny layout matrix (the suite compiles all but its plain row)

Per rank it prints whether the graph compiled (or the first error), the strategy file written, the
communication operators the compiler inserted by kind, whether the expert exchange is the AllToAll the plan
declares, and the rank's bytes of parameters, gradients and optimizer moments from the strategy file's
slices beside the estimator's (mixtral-ms-memory). Nothing runs after the compile.
Exit status 0 when every rank compiled and agrees, 1 when one did not, 2 on bad input. docs/parallel.md,
"Dry run"; the logic lives in mixtral_ms/tools/dryrun.py.
"""
from typing import Optional, Sequence

from mixtral_ms.tools.dryrun import main as _main


def main(argv: Optional[Sequence[str]] = None) -> int:
    return _main(argv, description=__doc__)
