#!/usr/bin/env python
"""Heatmap of expert load over training from RouterStatsMonitor's router_stats.jsonl.

    python scripts/plot_router.py --stats runs/tiny/router_stats.jsonl --output runs/tiny/router_load.png

One panel per layer: experts on the y axis, logged steps on the x axis, colour = share of the layer's
routed assignments (1/E is perfect balance); the dropped fraction is drawn under each panel.
"""
import argparse
import json
import os
import sys

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stats", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if not os.path.isfile(args.stats):
        print(f"error: no stats file {args.stats}", file=sys.stderr)
        return 2
    with open(args.stats, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        print(f"error: {args.stats} is empty", file=sys.stderr)
        return 2
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in records]
    load = np.array([r["tokens_per_expert"] for r in records], float)  # [T, L, E]
    share = load / np.maximum(load.sum(-1, keepdims=True), 1)
    dropped = np.array([r["dropped_fraction"] for r in records])        # [T, L]
    layers, experts = share.shape[1], share.shape[2]
    fig, axes = plt.subplots(2 * layers, 1, figsize=(10, 2.6 * layers + 1), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1] * layers})
    for layer in range(layers):
        ax, ax_drop = axes[2 * layer, 0], axes[2 * layer + 1, 0]
        im = ax.imshow(share[:, layer].T, aspect="auto", cmap="viridis", vmin=0, vmax=min(1.0, 3.0 / experts),
                       extent=[steps[0], steps[-1], experts - 0.5, -0.5], interpolation="nearest")
        ax.set_ylabel(f"layer {layer}\nexpert")
        ax.set_yticks(range(experts))
        fig.colorbar(im, ax=ax, label="share of assignments")
        ax_drop.plot(steps, dropped[:, layer], color="crimson")
        ax_drop.set_ylabel("dropped")
        ax_drop.set_ylim(0, max(0.05, float(dropped.max()) * 1.1))
        ax_drop.set_xlim(steps[0], steps[-1])
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"Expert load over training (balanced = {1 / experts:.3f} per expert)")
    fig.tight_layout()
    tmp = args.output + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
