#!/usr/bin/env python
"""Load balancing of issue 24 (docs/experts.md, "Balance: aux loss, aux-loss-free bias, both"), end to end on
CPU through the real CLIs and YAMLs.

  python bench/bench_balance.py [--run_dir runs/balance] [--seeds 0 1] [--share 0.3] [--eval_samples 96]

Domain A is data/corpus, domain B data/corpus_nt, split by scripts/preprocess_data.py as bench_experts.py
does (every 10th chapter held out, never trained on); to fit a short budget each run trains one epoch on
the first `--share` of its corpus' chapters (the same chapters held out). Arms, each with every seed of
`--seeds` (the YAML's `seed`: initial weights and data order), from configs/mixtral_tiny_cpu.yaml:

- on A from scratch: `aux` (router_aux_loss_coef 0.02, the shipped value), `bias` (coef 0,
  router_bias_update_rate RATE), `both` (0.02 and RATE);
- on B from `aux`'s final checkpoint of the same seed, grown by `experts.py grow --add 2 --init copy`
  (10 experts, every weight trained, bench_experts' continual learning rate): `grown` (aux loss only) and
  `grown_bias` (aux loss + RATE).

Per run: max/mean tokens per expert and the fraction of assignments dropped at the shipped capacity
factor 1.1, per layer, from <output_dir>/router_stats.jsonl (logged every LOG_EVERY steps; reported as
the mean over the logged steps of the second half of the run, and at the last step); held-out perplexity
(run_mixtral.py --run_mode eval); the median of MindFormers' per_step_time. Every step is skipped when
its output exists. Results: bench/results/balance.json, docs/experts_balance.png and the balance section
of docs/experts.md (between its balance markers).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import yaml

from bench_experts import BASE_YAML, CONTINUAL_LR, DOC, GROW, ROOT, Experiment

RESULTS = os.path.join(ROOT, "bench", "results", "balance.json")
PLOT = os.path.join(ROOT, "docs", "experts_balance.png")
BEGIN, END = "<!-- balance:begin (bench/bench_balance.py writes this part) -->", "<!-- balance:end -->"
# DeepSeek-V3's gamma and Megatron-Core's default moe_router_bias_update_rate. Softmax scores over 8 experts
# average 0.125 and the top-2 are often within a few hundredths of the next: in a ~70-step run the bias can
# move at most 0.07, enough to flip near ties towards underloaded experts, not to override the router.
RATE = 1e-3
FAST = 1e-2                  # a second rate: the bias can cross the whole score range within one short run
AUX = 0.02                   # configs/mixtral_tiny_cpu.yaml's router_aux_loss_coef
LOG_EVERY = 5                # RouterStatsMonitor.log_interval of these runs
ARMS_A = {"aux": {"router_aux_loss_coef": AUX, "router_bias_update_rate": 0.0},
          "bias": {"router_aux_loss_coef": 0.0, "router_bias_update_rate": RATE},
          "both": {"router_aux_loss_coef": AUX, "router_bias_update_rate": RATE},
          "bias_fast": {"router_aux_loss_coef": 0.0, "router_bias_update_rate": FAST}}
ARMS_B = {"grown": {"router_aux_loss_coef": AUX, "router_bias_update_rate": 0.0},
          "grown_bias": {"router_aux_loss_coef": AUX, "router_bias_update_rate": RATE},
          "grown_bias_fast": {"router_aux_loss_coef": AUX, "router_bias_update_rate": FAST}}
LABELS = {"aux": "A: aux loss 0.02", "bias": f"A: bias {RATE:g} only", "both": f"A: aux + bias {RATE:g}",
          "bias_fast": f"A: bias {FAST:g} only", "grown": f"B: grown +{GROW}, aux",
          "grown_bias": f"B: grown +{GROW}, aux + bias {RATE:g}", "grown_bias_fast": f"B: grown +{GROW}, aux + bias {FAST:g}"}


class Balance(Experiment):
    def __init__(self, run_dir: str, eval_samples: int, seeds: List[int], share: float) -> None:
        super().__init__(run_dir, eval_samples, points=1)
        self.seeds, self.share = seeds, share
        self.head_share = share  # data() writes the first `share` of each corpus' chapters to tune/ (trained on)

    def seeded_yaml(self, name: str, seed: int, model: dict, lr=None) -> str:
        path = self.yaml(name, model, lr)
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        config["seed"] = seed
        for callback in config["callbacks"]:
            if callback["type"] == "RouterStatsMonitor":
                callback.update(log_interval=LOG_EVERY, verbose=False)
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        return path

    def run(self) -> dict:
        with open(BASE_YAML, encoding="utf-8") as f:
            shipped = yaml.safe_load(f)
        self.batch = int(shipped["runner_config"]["batch_size"])
        experts = int(shipped["model"]["model_config"]["num_local_experts"])
        self.data()
        train = {d: self._path("tune", d, f"{d}.mindrecord") for d in "ab"}
        out = {"settings": {"seeds": self.seeds, "share": self.share, "steps_a": self.steps(train["a"]),
                            "steps_b": self.steps(train["b"]), "eval_samples": self.eval_samples,
                            "bias_update_rate": RATE, "fast_bias_update_rate": FAST, "aux_loss_coef": AUX, "capacity_factor":
                            shipped["model"]["model_config"]["capacity_factor"], "grow": GROW,
                            "continual_lr": CONTINUAL_LR, "router_log_interval": LOG_EVERY,
                            "cpu_count": os.cpu_count()}, "runs": {}}
        for seed in self.seeds:  # seed by seed, so that an interrupted run has whole seeds first
            for arm, model in ARMS_A.items():
                name = f"{arm}_s{seed}"
                config = self.seeded_yaml(name, seed, model)
                final = self.final(self.train(name, config, train["a"]))
                out["runs"][name] = self.measure(name, arm, seed, config, final, "a")
            base_name = f"aux_s{seed}"
            base = self.final(self.checkpoints(base_name))
            grown = self.experts(f"grow_s{seed}", ["grow", "--src", base, "--config",
                                                   self._path("yaml", f"{base_name}.yaml"), "--add", str(GROW),
                                                   "--init", "copy"], self._path(f"grown_s{seed}"))
            for arm, model in ARMS_B.items():
                name = f"{arm}_s{seed}"
                config = self.seeded_yaml(name, seed, {**model, "num_local_experts": experts + GROW}, CONTINUAL_LR)
                final = self.final(self.train(name, config, train["b"], grown))
                out["runs"][name] = self.measure(name, arm, seed, config, final, "ab")
        out["arms"] = summarize(out["runs"])
        return out

    @staticmethod
    def final(ckpts: Dict[int, str]) -> str:
        return ckpts[max(ckpts)]

    def measure(self, name: str, arm: str, seed: int, config: str, checkpoint: str, domains: str) -> dict:
        stats = router_stats(self._path(name, "router_stats.jsonl"))
        run = self.record["runs"][name]
        return {"arm": arm, "seed": seed, **{f"ppl_{d}": self.eval(name, config, checkpoint, d) for d in domains},
                "median_step_ms": run["median_step_ms"], "steps": run["steps"], "wall_s": run["wall_s"],
                "loadavg_before": run["loadavg_before"], "loadavg_after": run["loadavg_after"], **stats}


def router_stats(path: str) -> dict:
    """Per layer max/mean tokens per expert and dropped fraction: mean over the logged steps of the second
    half of the run, and at the last logged step; plus the per-expert load of every logged step."""
    records = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    last = records[-1]["step"]
    late = [r for r in records if r["step"] > last / 2]

    def imbalance(r):
        return [max(row) / max(statistics.mean(row), 1e-9) for row in r["tokens_per_expert"]]

    layers = len(records[0]["tokens_per_expert"])
    per_layer = [statistics.mean(imbalance(r)[i] for r in late) for i in range(layers)]
    dropped = [statistics.mean(r["dropped_fraction"][i] for r in late) for i in range(layers)]
    return {"max_over_mean": per_layer, "dropped_fraction": dropped,
            "max_over_mean_last": imbalance(records[-1]), "dropped_fraction_last": records[-1]["dropped_fraction"],
            "max_over_mean_avg": statistics.mean(per_layer), "dropped_fraction_avg": statistics.mean(dropped),
            "load_curve": {str(r["step"]): r["tokens_per_expert"] for r in records}}


def summarize(runs: dict) -> dict:
    """Per arm: mean over seeds and the seed spread (max - min) of each metric."""
    arms: Dict[str, dict] = {}
    for r in runs.values():
        arms.setdefault(r["arm"], []).append(r)
    out = {}
    for arm, rs in arms.items():
        row = {"seeds": [r["seed"] for r in rs]}
        for key in ("max_over_mean_avg", "dropped_fraction_avg", "ppl_a", "ppl_b", "median_step_ms"):
            values = [r[key] for r in rs if r.get(key) is not None]
            if values:
                row[key] = statistics.mean(values)
                row[f"{key}_spread"] = max(values) - min(values)
        out[arm] = row
    for arm, row in out.items():  # paired by seed: the same initial weights and data order as the reference
        ref = "grown" if arm.startswith("grown") else "aux"
        if arm == ref or ref not in arms:
            continue
        mine = {r["seed"]: r for r in arms[arm]}
        for key in ("max_over_mean_avg", "dropped_fraction_avg", "ppl_a", "ppl_b"):
            row[f"{key}_minus_{ref}"] = [mine[r["seed"]][key] - r[key] for r in arms[ref]
                                         if r["seed"] in mine and r.get(key) is not None]
    return out


# ------------------------------------------------------------------------------------------ report

def plot(out: dict, seed: int, layer: int = 1) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [[a for a in LABELS if f"{a}_s{seed}" in out["runs"] and a.startswith("grown") == grown]
            for grown in (False, True)]
    cols = max(len(r) for r in rows)
    fig, grid = plt.subplots(2, cols, figsize=(3.4 * cols, 6.6), squeeze=False)
    for i, row in enumerate(rows):
        for ax in grid[i][len(row):]:
            ax.axis("off")
        grid[i][0].set_ylabel(f"assignments per expert, layer {layer}")
    for ax, arm in [(grid[i][j], arm) for i, row in enumerate(rows) for j, arm in enumerate(row)]:
        curve = out["runs"][f"{arm}_s{seed}"]["load_curve"]
        steps = sorted(int(s) for s in curve)
        experts = len(curve[str(steps[0])][layer])
        for e in range(experts):
            new = e >= experts - GROW and arm.startswith("grown")
            ax.plot(steps, [curve[str(s)][layer][e] for s in steps], lw=2 if new else 1, ls="--" if new else "-",
                    label=f"new {e}" if new else None)
        total = sum(curve[str(steps[0])][layer])
        ax.axhline(total / experts, color="black", lw=0.8, ls=":")
        ax.axhline(1.1 * total / experts, color="red", lw=0.8, ls=":")
        ax.set_title(LABELS[arm], fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if arm.startswith("grown"):
            ax.legend(fontsize=7)
    fig.suptitle(f"per-expert load over training (seed {seed}, layer {layer}); dotted: mean (black) and "
                 "capacity 1.1 x mean (red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def table(out: dict) -> str:
    s = out["settings"]
    rows = ["| arm | seeds | steps | max/mean load (2nd half, mean of layers) | dropped at cf 1.1 | held-out ppl A | "
            "held-out ppl B | median step (ms) |", "|---|---|---:|---:|---:|---:|---:|---:|"]

    def cell(r, key, spec):
        if key not in r:
            return ""
        return f"{format(r[key], spec)} ± {format(r[key + '_spread'] / 2, spec)}"

    for arm in LABELS:
        if arm not in out["arms"]:
            continue
        r = out["arms"][arm]
        steps = s["steps_b"] if arm.startswith("grown") else s["steps_a"]
        rows.append(f"| {LABELS[arm]} | {', '.join(map(str, r['seeds']))} | {steps} | {cell(r, 'max_over_mean_avg', '.3f')} | "
                    f"{cell(r, 'dropped_fraction_avg', '.2%')} | {cell(r, 'ppl_a', '.1f')} | {cell(r, 'ppl_b', '.1f')} | "
                    f"{cell(r, 'median_step_ms', '.0f')} |")
    rows += ["", "Paired by seed (this arm minus the aux arm of the same seed; grown arms minus `grown`), one value "
             "per seed, beside the reference arm's seed spread (max - min):", "",
             "| arm | max/mean | dropped | ppl A | ppl B |", "|---|---|---|---|---|"]
    for arm in LABELS:
        r = out["arms"].get(arm, {})
        ref = out["arms"].get("grown" if arm.startswith("grown") else "aux", {})
        if not any(k.endswith(("_minus_aux", "_minus_grown")) for k in r):
            continue
        cells = []
        for key, spec in (("max_over_mean_avg", "+.3f"), ("dropped_fraction_avg", "+.1%"), ("ppl_a", "+.1f"),
                          ("ppl_b", "+.1f")):
            diffs = next((v for k, v in r.items() if k.startswith(key + "_minus_")), [])
            spread = ref.get(key + "_spread")
            cells.append(", ".join(format(d, spec) for d in diffs) +
                         (f" (seed spread {format(spread, spec.lstrip('+'))})" if diffs and spread is not None else ""))
        rows.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    rows += ["", "Per run:", "",
             "| run | max/mean layer 0, 1 | dropped layer 0, 1 | ppl A | ppl B | median step (ms) | load avg before/after |",
             "|---|---|---|---:|---:|---:|---|"]
    for name, r in out["runs"].items():
        rows.append(f"| {name} | {', '.join(f'{v:.3f}' for v in r['max_over_mean'])} | "
                    f"{', '.join(f'{v:.2%}' for v in r['dropped_fraction'])} | {r.get('ppl_a', float('nan')):.1f} | "
                    f"{r['ppl_b']:.1f} | {r['median_step_ms']:.0f} | "
                    f"{r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f} |" if "ppl_b" in r else
                    f"| {name} | {', '.join(f'{v:.3f}' for v in r['max_over_mean'])} | "
                    f"{', '.join(f'{v:.2%}' for v in r['dropped_fraction'])} | {r['ppl_a']:.1f} |  | "
                    f"{r['median_step_ms']:.0f} | {r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f} |")
    return "\n".join(rows)


def write_doc(out: dict, notes: str) -> None:
    s = out["settings"]
    lines = [BEGIN, "", f"Measured {out['date']} by `python bench/bench_balance.py` on {s['cpu_count']} shared CPU "
             f"cores; each run one epoch over the first {s['share']:.0%} of its corpus' chapters ({s['steps_a']} "
             f"steps on A, {s['steps_b']} on B, batch 8 x 129 tokens), {s['eval_samples']} held-out samples per "
             f"perplexity. Values are the mean over seeds ± half the spread between them (max - min over "
             f"{len(s['seeds'])} seeds). The {len(out['runs'])} training runs took {s['train_wall_s_total']:.0f} s of wall time "
             "(startup included; the evaluations and the grows come on top).", "", table(out), "", notes, "",
             "![per-expert load over steps](experts_balance.png)", "", END]
    text = open(DOC, encoding="utf-8").read()
    if BEGIN not in text:
        raise SystemExit(f"{DOC} has no {BEGIN!r} marker")
    head, rest = text.split(BEGIN, 1)
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(head + "\n".join(lines) + rest.split(END, 1)[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", default=os.path.join(ROOT, "runs", "balance"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--share", type=float, default=0.3, help="share of each corpus' chapters trained on")
    parser.add_argument("--eval_samples", type=int, default=96)
    parser.add_argument("--notes", default="", help="a file whose text goes under the table in docs/experts.md")
    args = parser.parse_args()
    out = Balance(args.run_dir, args.eval_samples, args.seeds, args.share).run()
    out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out["settings"]["train_wall_s_total"] = round(sum(r["wall_s"] for r in out["runs"].values()), 1)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    plot(out, args.seeds[0])
    write_doc(out, open(args.notes, encoding="utf-8").read().strip() if args.notes else "")
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
