#!/usr/bin/env python
"""What a dynamic shape costs a CPU kernel here: 16 multiplies of R x 1024 rows, the rows taken with a
static index or after `NonZero` (a dynamic shape, as in the dropless per-expert segments), one graph each.

    source scripts/env.sh
    python bench/dynamic_ops.py [--repeats 7]

Prints the median ms per graph call for R = 16, 256, 1024. MindSpore's CPU profile charges a kernel after
a dynamic shape with the wait for it, so its per-op times on the dropless path overstate the kernels;
this is the kernels' own extra cost.
"""
from __future__ import annotations

import argparse

import numpy as np

from bench_vs_hf import median_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    import mindspore as ms
    from mindspore import Tensor, nn, ops
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    rng = np.random.default_rng(0)

    class Multiplies(nn.Cell):
        def __init__(self, dynamic: bool):
            super().__init__()
            self.dynamic = dynamic

        def construct(self, x, selected):
            if self.dynamic:
                rows = ops.gather(x, ops.nonzero(selected).reshape(-1), 0)
            else:
                rows = ops.gather(x, ops.cast(ops.arange(x.shape[0]), ms.int32), 0)
            outs = ()
            for _ in range(16):
                outs += ((rows * rows)[0, 0],)
            return outs

    table = Tensor(rng.random((1024, 1024), dtype=np.float32))
    for count in (16, 256, 1024):
        selected = np.zeros(1024, bool)
        selected[:count] = True
        for dynamic in (False, True):
            cell = Multiplies(dynamic)
            x = table if dynamic else Tensor(rng.random((count, 1024), dtype=np.float32))
            seconds = median_time(lambda: cell(x, Tensor(selected))[0].asnumpy(), args.repeats)
            print(f"{count:5d} rows, {'dynamic' if dynamic else 'static '} shape: {1e3 * seconds:.2f} ms "
                  "for 16 multiplies", flush=True)


if __name__ == "__main__":
    main()
