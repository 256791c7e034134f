"""Heatmap of expert load over training from RouterStatsMonitor's router_stats.jsonl.

    python scripts/plot_router.py --stats runs/tiny/router_stats.jsonl --output runs/tiny/router_load.png

Per layer: a heatmap with experts on the y axis and training steps on the x axis, colour = the expert's
share of the layer's routed assignments (1/E is perfect balance; one colour scale for all layers), and
under it the fraction of assignments dropped for lack of capacity. A last panel draws the
load-balancing (aux) loss and the router z-loss. Bad input prints one line `error: ...`, exit 2.
"""
import argparse
import json
import math
import os


from mixtral_ms import cli  # first: signals are handled before anything heavy is imported

import numpy as np

KEYS = ("step", "tokens_per_expert", "dropped_fraction", "aux_loss", "z_loss")  # what the plot draws


def _number(value, finite: bool = True) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (math.isfinite(value) or not finite)


def _check(record, shape):
    """The shape (layers, experts) of a RouterStatsMonitor record; raises ValueError naming what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in KEYS if k not in record]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    if not isinstance(record["step"], int) or isinstance(record["step"], bool):
        raise ValueError(f"step must be an integer, got {record['step']!r}")
    for key in ("aux_loss", "z_loss"):  # NaN / inf of a diverged run are drawn as gaps
        if not _number(record[key], finite=False):
            raise ValueError(f"{key} must be a number, got {record[key]!r}")
    load, dropped = record["tokens_per_expert"], record["dropped_fraction"]
    if not (isinstance(load, list) and load and all(isinstance(r, list) and r and len(r) == len(load[0])
                                                    and all(_number(v) for v in r) for r in load)):
        raise ValueError("tokens_per_expert must be a [layers][experts] table of numbers")
    if not (isinstance(dropped, list) and len(dropped) == len(load) and all(_number(v, False) for v in dropped)):
        raise ValueError(f"dropped_fraction must hold one number per layer ({len(load)})")
    names = record.get("layers")  # written with a layer pattern: the model's layer of each row
    if names is not None and not (isinstance(names, list) and len(names) == len(load) and
                                  all(isinstance(v, int) and not isinstance(v, bool) for v in names)):
        raise ValueError(f"layers must hold one layer index per row ({len(load)})")
    found = (len(load), len(load[0]))
    if shape is not None and found != shape:
        raise ValueError(f"{found[0]} layers x {found[1]} experts, but earlier records have {shape[0]} x {shape[1]}")
    return found


def read_stats(path):
    """Records sorted by step (a later record for the same step, e.g. after a resume, wins); a record the
    plot cannot draw is refused naming its line."""
    records, shape = {}, None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                record = json.loads(line)
                shape = _check(record, shape)
            except (ValueError, RecursionError) as err:  # JSON, UTF-8 and _check's refusals
                raise cli.BadInput(f"{path}:{number}: not a router-stats record ({err})") from None
            records[record["step"]] = record
    return [records[s] for s in sorted(records)]


def edges(steps):
    """Cell edges around each logged step, so uneven logging intervals keep their true width."""
    steps = np.asarray(steps, float)
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]])


def plot(records, output):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in records]
    load = np.array([r["tokens_per_expert"] for r in records], float)  # [T, L, E]
    share = load / np.maximum(load.sum(-1, keepdims=True), 1)
    dropped = np.array([r["dropped_fraction"] for r in records], float)  # [T, L]
    layers, experts = share.shape[1], share.shape[2]
    names = records[-1].get("layers") or list(range(layers))  # the model's layer index of each row
    x = edges(steps)
    ratios = [3, 1] * layers + [1.3]
    fig, axes = plt.subplots(len(ratios), 1, figsize=(11, 2.3 * layers + 2.2), sharex=True,
                             gridspec_kw={"height_ratios": ratios})
    vmax = max(2.5 / experts, float(np.percentile(share, 99)))
    mesh = None
    for layer in range(layers):
        ax, ax_drop = axes[2 * layer], axes[2 * layer + 1]
        mesh = ax.pcolormesh(x, np.arange(experts + 1) - 0.5, share[:, layer].T, cmap="viridis", vmin=0,
                             vmax=vmax, shading="flat")
        ax.set_ylim(experts - 0.5, -0.5)
        ax.set_yticks(range(experts))
        ax.set_ylabel(f"layer {names[layer]}\nexpert")
        ax_drop.fill_between(steps, 100 * dropped[:, layer], color="crimson", alpha=0.3, step="mid")
        ax_drop.plot(steps, 100 * dropped[:, layer], color="crimson", drawstyle="steps-mid")
        ax_drop.set_ylim(0, max(5.0, 110 * float(dropped.max())))
        ax_drop.set_ylabel("dropped %")
        ax_drop.grid(alpha=0.3)
    ax_loss = axes[-1]
    ax_loss.plot(steps, [r["aux_loss"] for r in records], color="tab:blue", label="aux (load-balancing) loss")
    ax_loss.plot(steps, [r["z_loss"] for r in records], color="tab:orange", label="router z-loss")
    ax_loss.legend(loc="upper right", fontsize=8, ncol=2)
    ax_loss.set_ylabel("router\nlosses")
    ax_loss.grid(alpha=0.3)
    ax_loss.set_xlabel("training step")
    ax_loss.set_xlim(x[0], x[-1])
    fig.colorbar(mesh, ax=list(axes), label="share of the layer's assignments", fraction=0.03, pad=0.02)
    fig.suptitle(f"Expert load over training: {layers} layers x {experts} experts "
                 f"(balanced = {1 / experts:.3f} per expert)")
    from mixtral_ms.outputs import replacing
    try:
        with replacing(output, "--output") as tmp:  # whole or not at all; a symlink is written through
            fig.savefig(tmp, dpi=110, format=os.path.splitext(output)[1][1:].lower() or "png")
    finally:
        plt.close(fig)


def _main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stats", required=True, help="router_stats.jsonl written by RouterStatsMonitor")
    parser.add_argument("--output", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    from mixtral_ms.outputs import file_target
    if not os.path.isfile(args.stats):
        raise cli.BadInput(f"no stats file {args.stats}")
    file_target(args.output, "--output")  # a folder or an unwritable place: refused before the plot
    records = read_stats(args.stats)
    if not records:
        raise cli.BadInput(f"{args.stats} is empty")
    plot(records, args.output)
    last = records[-1]
    print(f"router at step {last['step']}: aux loss {last['aux_loss']:.4f}, z-loss {last['z_loss']:.3f}")
    for layer, row, frac in zip(last.get("layers") or range(len(last["tokens_per_expert"])),
                                last["tokens_per_expert"], last["dropped_fraction"]):
        print(f"  layer {layer}: tokens/expert {row} | dropped {100 * frac:.1f}%")
    print(f"wrote {args.output}")
    return 0


def main(argv=None) -> int:
    """Exit status: 0, 2 for bad input (one line `error: ...`), 130 / 143 after SIGINT / SIGTERM."""
    return cli.run(_main, argv)

