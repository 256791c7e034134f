"""What both msrun workers of the test suite share: the 2-process DATA_PARALLEL start and the files a
rank leaves for the test (`rank<r>.npz`: final parameters, `rank<r>.json`: the rank's record)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def start() -> Tuple[str, int, int]:
    """Parse `--workdir`, set graph mode on CPU, join the msrun group and set DATA_PARALLEL with
    gradient mean; returns (workdir, rank, world size)."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    init()
    rank, world = get_rank(), get_group_size()
    ms.set_auto_parallel_context(parallel_mode="data_parallel", gradients_mean=True, device_num=world)
    return args.workdir, rank, world


def finish(workdir: str, model, record: dict) -> None:
    """Write the rank's final parameters and its record (which names its rank and world size)."""
    rank = record["rank"]
    np.savez(os.path.join(workdir, f"rank{rank}.npz"), **{p.name: p.asnumpy() for p in model.trainable_params()})
    with open(os.path.join(workdir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(record, f)
    print(f"rank {rank}/{record['world']} done", flush=True)
