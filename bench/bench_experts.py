#!/usr/bin/env python
"""The pluggable-experts experiment of docs/experts.md, end to end on CPU through the real CLIs and YAMLs.

  python bench/bench_experts.py [--run_dir runs/experts] [--eval_samples 96] [--points 3]

Domain A is data/corpus (Genesis-Ruth), domain B data/corpus_nt (Matthew-Revelation); each is split by
scripts/preprocess_data.py into a training and a held-out part (every 10th chapter, never trained on),
tagged with its domain id (0, 1). Then, with run YAMLs generated under <run_dir>/yaml from
configs/mixtral_tiny_cpu.yaml (each read by scripts/run_mixtral.py through MindFormerConfig):

- base: the tiny model (8 experts, top-2) trained one epoch on A.
- continual, one epoch on B from base, three ways: `finetune` (every weight), `grow` (experts.py grow
  --add 2 --init copy, then old experts and router rows frozen: runner_wrapper.freeze), `grow_distill`
  (grow plus runner_wrapper.distill against base, kd_coef 1). Held-out perplexity on A and B at
  `--points` checkpoints per arm (plus the start).
- RRE: router_type rre with 2 groups of 4 experts, trained on A + B (a dataset_dir folder of both, domain
  ids from preprocessing) for as many steps as base + one continual arm; experts.py extract of group 1
  (B's experts), scored against the full model on B.
- BTX: branch A (base, one more epoch on A) and branch B (the finetune arm) mixed by experts.py mix
  (16 experts, new router), then a short router-only fine-tune (everything else frozen) on the first 15%
  of both training sets, against each branch alone.

Every step is skipped when its output exists, so an interrupted run resumes where it stopped. Results go
to bench/results/experts.json, plots to docs/experts_*.png and the table into docs/experts.md (between
its results markers). Step times are medians of MindFormers' per_step_time on a shared machine, recorded
with the load average (os.getloadavg) around each run: compare them only within one run of this script.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
BASE_YAML = os.path.join(ROOT, "configs", "mixtral_tiny_cpu.yaml")
RESULTS = os.path.join(ROOT, "bench", "results", "experts.json")
DOC = os.path.join(ROOT, "docs", "experts.md")
BEGIN, END = "<!-- results:begin (bench/bench_experts.py writes this part) -->", "<!-- results:end -->"
GROW = 2                     # experts added by the grow arms
CONTINUAL_LR = (1e-3, 1e-4)  # learning rate and lr_end of every run that starts from a trained model
TUNE_SHARE = 0.15            # BTX router fine-tune: this share of each training corpus (its first chapters)
ARMS = ("finetune", "grow", "grow_distill")


def sh(name: str, args: List[str], log_dir: str) -> str:
    """Run a CLI (python script + args) with its output in <log_dir>/<name>.log; stop on failure."""
    log = os.path.join(log_dir, f"{name}.log")
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(os.path.relpath(a, ROOT) if os.path.isabs(a) else a for a in args)}",
          flush=True)
    with open(log, "w", encoding="utf-8") as f:
        run = subprocess.run([PY, *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if run.returncode:
        raise SystemExit(f"{name} failed (exit {run.returncode}); see {log}")
    return log


class Experiment:
    def __init__(self, run_dir: str, eval_samples: int, points: int) -> None:
        self.dir = os.path.abspath(run_dir)
        self.eval_samples, self.points = eval_samples, points
        self.head_share = TUNE_SHARE  # data(): the share of each corpus' first chapters written to tune/
        self.logs = os.path.join(self.dir, "logs")
        for sub in ("logs", "yaml", "eval", "train", "heldout", "tune", "text"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        self.record = json.load(open(self._path("record.json"))) if os.path.isfile(self._path("record.json")) else {}

    def _path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def save(self) -> None:
        with open(self._path("record.json.tmp"), "w") as f:
            json.dump(self.record, f, indent=1)
        os.replace(self._path("record.json.tmp"), self._path("record.json"))

    # ------------------------------------------------------------------------------------------ data
    def preprocess(self, name: str, text: str, domain: int, train: str, heldout: str) -> None:
        if os.path.isfile(train) and os.path.isfile(heldout):
            return
        sh(f"preprocess_{name}", [os.path.join(ROOT, "scripts", "preprocess_data.py"), "--input", text,
                                  "--seq_length", "128", "--output", train, "--heldout_fraction", "0.1",
                                  "--heldout_output", heldout, "--domain_id", str(domain), "--overwrite"], self.logs)

    def data(self) -> None:
        for name, corpus, domain in (("a", "corpus", 0), ("b", "corpus_nt", 1)):
            text = glob.glob(os.path.join(ROOT, "data", corpus, "*.txt"))[0]
            # train/ holds only training splits: as a dataset_dir folder it is A + B (the RRE run)
            self.preprocess(name, text, domain, self._path("train", name, f"{name}.mindrecord"),
                            self._path("heldout", f"{name}.mindrecord"))
            # the first chapters: the same documents are held out (every 10th by index), and not used
            lines = open(text, encoding="utf-8").read().splitlines(keepends=True)
            head = self._path("text", f"{name}_head.txt")
            if not os.path.isfile(head):
                with open(head, "w", encoding="utf-8") as f:
                    f.writelines(lines[:math.ceil(len(lines) * self.head_share)])
            self.preprocess(f"{name}_head", head, domain, self._path("tune", name, f"{name}.mindrecord"),
                            self._path("text", f"{name}_head_heldout.mindrecord"))

    def steps(self, dataset: str) -> int:
        from mixtral_ms.run.data import mindrecord_info
        return mindrecord_info(dataset)["num_samples"] // self.batch

    # ------------------------------------------------------------------------------------------ runs
    def yaml(self, name: str, model: Optional[dict] = None, lr: Optional[tuple] = None, wrapper: Optional[dict] = None,
             columns: Optional[list] = None, save_every: Optional[int] = None) -> str:
        """A run YAML: the shipped tiny config with these changes, written under <run_dir>/yaml."""
        with open(BASE_YAML, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        config["output_dir"] = self._path(name)
        config["runner_config"]["epochs"] = 1
        config["model"]["model_config"].update(model or {})
        if lr:
            config["lr_schedule"].update(learning_rate=lr[0], lr_end=lr[1])
        config["runner_wrapper"].update(wrapper or {})
        if columns:
            config["train_dataset"]["input_columns"] = columns
        for callback in config["callbacks"]:
            if callback["type"] == "CheckpointMonitor" and save_every:
                callback.update(save_checkpoint_steps=save_every, keep_checkpoint_max=self.points + 2)
        path = self._path("yaml", f"{name}.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        return path

    def train(self, name: str, config: str, dataset: str, load: Optional[str] = None) -> Dict[int, str]:
        """Train one epoch; returns {step: checkpoint file}; records step time and load average."""
        done = self.checkpoints(name)
        if name in self.record.get("runs", {}) and done:
            return done
        load_before = os.getloadavg()
        start = time.time()
        args = [os.path.join(ROOT, "scripts", "run_mixtral.py"), "--config", config, "--run_mode", "train",
                "--train_dataset", dataset] + (["--load_checkpoint", load] if load else [])
        log = sh(f"train_{name}", args, self.logs)
        times = [int(t) for t in re.findall(r"per_step_time: (\d+)ms", open(log, encoding="utf-8").read())]
        self.record.setdefault("runs", {})[name] = {
            "steps": len(times), "median_step_ms": statistics.median(times[1:]) if len(times) > 1 else None,
            "first_step_ms": times[0] if times else None, "wall_s": round(time.time() - start, 1),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
        self.save()
        return self.checkpoints(name)

    def checkpoints(self, name: str) -> Dict[int, str]:
        files = glob.glob(self._path(name, "checkpoint", "rank_0", "*.ckpt"))
        return {int(re.search(r"-\d+_(\d+)\.ckpt$", f).group(1)): f for f in files}

    def eval(self, name: str, config: str, checkpoint: str, domain: str) -> float:
        out = self._path("eval", f"{name}_{domain}.json")
        if not os.path.isfile(out):
            sh(f"eval_{name}_{domain}", [os.path.join(ROOT, "scripts", "run_mixtral.py"), "--config", config,
                                         "--run_mode", "eval", "--load_checkpoint", checkpoint,
                                         "--eval_dataset", self._path("heldout", f"{domain}.mindrecord"),
                                         "--eval_samples", str(self.eval_samples), "--eval_output", out,
                                         "--output_dir", self._path("eval", "out")], self.logs)
        return json.load(open(out))["ppl"]

    def experts(self, name: str, args: List[str], dst: str) -> str:
        if not os.path.isfile(os.path.join(dst, "config.json")):
            sh(f"experts_{name}", [os.path.join(ROOT, "scripts", "experts.py"), *args, "--dst", dst, "--quiet"], self.logs)
        return dst

    # ------------------------------------------------------------------------------------------ the experiment
    def run(self) -> dict:
        with open(BASE_YAML, encoding="utf-8") as f:
            shipped = yaml.safe_load(f)
        self.batch = int(shipped["runner_config"]["batch_size"])
        self.data()
        train_a, train_b = self._path("train", "a", "a.mindrecord"), self._path("train", "b", "b.mindrecord")
        steps_a, steps_b = self.steps(train_a), self.steps(train_b)
        every_b = math.ceil(steps_b / self.points)
        experts = int(shipped["model"]["model_config"]["num_local_experts"])
        old = list(range(experts))
        out = {"settings": {"eval_samples": self.eval_samples, "batch_size": self.batch, "seq_length": 128,
                            "steps_a": steps_a, "steps_b": steps_b, "grow": GROW, "continual_lr": CONTINUAL_LR,
                            "cpu_count": os.cpu_count()}}

        # base on A
        base_yaml = self.yaml("base")
        base = self.train("base", base_yaml, train_a)[steps_a]
        curves = {"base": {0: {d: self.eval("base", base_yaml, base, d) for d in "ab"}}}

        # three continual arms on B
        grown = self.experts("grow", ["grow", "--src", base, "--config", base_yaml, "--add", str(GROW),
                                      "--init", "copy"], self._path("grown"))
        freeze = {"experts": old, "router_rows": old}
        distill = {"teacher": base, "teacher_config": base_yaml, "kd_coef": 1.0, "temperature": 1.0}
        arms = {"finetune": (self.yaml("finetune", lr=CONTINUAL_LR, save_every=every_b), base, {}),
                "grow": (self.yaml("grow", {"num_local_experts": experts + GROW}, CONTINUAL_LR, {"freeze": freeze},
                                   save_every=every_b), grown, freeze),
                "grow_distill": (self.yaml("grow_distill", {"num_local_experts": experts + GROW}, CONTINUAL_LR,
                                           {"freeze": freeze, "distill": distill}, save_every=every_b), grown, freeze)}
        for arm, (config, start, frozen) in arms.items():
            ckpts = self.train(arm, config, train_b, start)
            curve = {0: {d: self.eval("base" if start == base else "grown", config, start, d) for d in "ab"}}
            for step in sorted(ckpts):
                curve[step] = {d: self.eval(f"{arm}_{step}", config, ckpts[step], d) for d in "ab"}
            curves[arm] = curve
            total, trainable = param_counts(config, frozen)
            out.setdefault("continual", {})[arm] = {
                "params": total, "trainable_params": trainable, **self.record["runs"][arm],
                "ppl_a": curve[max(curve)]["a"], "ppl_b": curve[max(curve)]["b"]}
        total, _ = param_counts(base_yaml, {})
        out["base"] = {"params": total, "trainable_params": total, **self.record["runs"]["base"],
                       "ppl_a": curves["base"][0]["a"], "ppl_b": curves["base"][0]["b"]}
        out["curves"] = {arm: {str(s): v for s, v in c.items()} for arm, c in curves.items()}

        # RRE on A + B, then B's group alone
        size = experts // 2
        rre_model = {"router_type": "rre", "rre_groups": 2, "rre_seed": 0}
        rre_yaml = self.yaml("rre", rre_model, columns=["input_ids", "domain_ids"])
        rre_ckpts = self.train("rre", rre_yaml, self._path("train"))
        rre = rre_ckpts[max(rre_ckpts)]
        group_b = ",".join(map(str, range(size, 2 * size)))
        rre_b = self.experts("rre_extract", ["extract", "--src", rre, "--config", rre_yaml, "--experts", group_b],
                             self._path("rre_b"))
        rre_b_yaml = self.yaml("rre_b", {**rre_model, "num_local_experts": size, "rre_groups": 1},
                               columns=["input_ids", "domain_ids"])
        out["rre"] = {
            "full": {"params": param_counts(rre_yaml, {})[0], "trainable_params": param_counts(rre_yaml, {})[1],
                     **self.record["runs"]["rre"],
                     "ppl_a": self.eval("rre", rre_yaml, rre, "a"), "ppl_b": self.eval("rre", rre_yaml, rre, "b")},
            "extract_b": {"params": param_counts(rre_b_yaml, {})[0], "experts": group_b,
                          "ppl_b": self.eval("rre_b", rre_b_yaml, rre_b, "b")}}

        # BTX: branch A (one more epoch on A) + branch B (the finetune arm), mixed, router fine-tuned
        branch_a_yaml = self.yaml("branch_a", lr=CONTINUAL_LR)
        branch_a = self.train("branch_a", branch_a_yaml, train_a, base)[steps_a]
        branch_b = self.checkpoints("finetune")[steps_b]
        mixed = self.experts("mix", ["mix", "--branches", branch_a, branch_b, "--config", base_yaml,
                                     "--router", "new"], self._path("btx_mixed"))
        every = list(range(2 * experts))
        btx_yaml = self.yaml("btx", {"num_local_experts": 2 * experts}, (3e-3, 3e-4),
                             {"freeze": {"experts": every, "non_moe": True}})
        btx_ckpts = self.train("btx", btx_yaml, self._path("tune"), mixed)
        btx = btx_ckpts[max(btx_ckpts)]
        out["btx"] = {
            "branch_a": {d_key(d): self.eval("branch_a", branch_a_yaml, branch_a, d) for d in "ab"},
            "branch_b": {d_key(d): curves["finetune"][steps_b][d] for d in "ab"},
            "mixed_untuned": {d_key(d): self.eval("btx_mixed", btx_yaml, mixed, d) for d in "ab"},
            "mixed_tuned": {d_key(d): self.eval("btx", btx_yaml, btx, d) for d in "ab"},
            "params": param_counts(btx_yaml, {})[0],
            "router_tune": {"trainable_params": param_counts(btx_yaml, {"experts": every, "non_moe": True})[1],
                            **self.record["runs"]["btx"]}}
        out["btx"]["branch_a"].update(self.record["runs"]["branch_a"])
        return out


def d_key(domain: str) -> str:
    return f"ppl_{domain}"


def param_counts(config_path: str, freeze: dict) -> tuple:
    """(parameters, trainable parameters) of a run YAML's model under a runner_wrapper.freeze section;
    an RRE gate is never trained (router.RandomRouter)."""
    import numpy as np
    from mixtral_ms.checkpoint.name_map import parameter_specs
    from mixtral_ms.model.schema import model_dims
    from mixtral_ms.run.freeze import check_freeze, frozen_mask
    with open(config_path, encoding="utf-8") as f:
        dims = model_dims(yaml.safe_load(f)["model"]["model_config"])
    spec = check_freeze(freeze, dims)
    total = trainable = 0
    for name, p in parameter_specs(dims).items():
        n = int(np.prod(p.shape))
        mask = frozen_mask(name, p.shape, spec)
        frozen = 0 if mask is None else int(np.broadcast_to(mask, p.shape).sum())
        if dims.router_type == "rre" and name.endswith("block_sparse_moe.gate.weight"):
            frozen = n
        total, trainable = total + n, trainable + n - frozen
    return total, trainable


# ------------------------------------------------------------------------------------------ report

def plot(out: dict) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = {"finetune": "(a) fine-tune all", "grow": f"(b) grow +{GROW}, old frozen",
             "grow_distill": "(c) (b) + distillation"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, domain, title in zip(axes, "ab", ("held-out A (Genesis-Ruth): forgetting", "held-out B (Matthew-Revelation): learning")):
        for arm in ARMS:
            curve = out["curves"][arm]
            steps = sorted(int(s) for s in curve)
            ax.plot(steps, [curve[str(s)][domain] for s in steps], marker="o", label=names[arm])
        ax.axhline(out["base"][d_key(domain)], color="gray", ls="--", lw=1, label="base (trained on A)")
        ax.set_title(title)
        ax.set_xlabel("steps on B")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    continual = os.path.join(ROOT, "docs", "experts_continual.png")
    fig.savefig(continual, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.6))
    bars = [("branch A", out["btx"]["branch_a"]), ("branch B", out["btx"]["branch_b"]),
            ("BTX mix, new router", out["btx"]["mixed_untuned"]), ("BTX mix + router tune", out["btx"]["mixed_tuned"]),
            ("RRE full", out["rre"]["full"]), ("RRE group B alone", {"ppl_b": out["rre"]["extract_b"]["ppl_b"]})]
    width = 0.38
    for i, domain in enumerate("ab"):
        xs = [j + (i - 0.5) * width for j in range(len(bars))]
        ax.bar(xs, [b.get(d_key(domain), float("nan")) for _, b in bars], width, label=f"held-out {domain.upper()}")
    ax.set_xticks(range(len(bars)), [n for n, _ in bars], rotation=15, fontsize=8)
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    mixes = os.path.join(ROOT, "docs", "experts_btx_rre.png")
    fig.savefig(mixes, dpi=110)
    plt.close(fig)
    return [continual, mixes]


def table(out: dict) -> str:
    s = out["settings"]
    rows = ["| model | params | trainable | steps | median step (ms) | load avg (1 min, before/after) | ppl A | ppl B |",
            "|---|---:|---:|---:|---:|---|---:|---:|"]

    def fmt(value, spec=","):
        return "" if value is None else format(value, spec)

    def row(name, r):
        load = f"{r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f}" if "loadavg_before" in r else ""
        rows.append(f"| {name} | {fmt(r.get('params'))} | {fmt(r.get('trainable_params'))} | {fmt(r.get('steps'))} | "
                    f"{fmt(r.get('median_step_ms'), '.0f')} | {load} | {fmt(r.get('ppl_a'), '.2f')} | "
                    f"{fmt(r.get('ppl_b'), '.2f')} |")
    row(f"base: {s['steps_a']} steps on A", out["base"])
    labels = {"finetune": "(a) fine-tune all", "grow": f"(b) grow +{s['grow']}, old experts + router rows frozen",
              "grow_distill": "(c) (b) + distillation (kd_coef 1)"}
    for arm in ARMS:
        row(f"{labels[arm]}: {s['steps_b']} steps on B", out["continual"][arm])
    row("RRE (2 groups of 4) on A + B", out["rre"]["full"])
    row(f"RRE group B alone (experts {out['rre']['extract_b']['experts']})", out["rre"]["extract_b"])
    btx = out["btx"]
    row("BTX branch A (base + 1 epoch on A)", {"params": out["base"]["params"],
                                               "trainable_params": out["base"]["params"], **btx["branch_a"]})
    row("BTX branch B (= (a))", {"params": out["base"]["params"], **btx["branch_b"]})
    row("BTX mix of A + B, new router (16 experts)", {"params": btx["params"], **btx["mixed_untuned"]})
    row("BTX mix + router-only tune", {"params": btx["params"], **btx["router_tune"], **btx["mixed_tuned"]})
    return "\n".join(rows)


def write_doc(out: dict) -> None:
    base = out["base"]
    lines = [BEGIN, "", f"Measured {out['date']} on {out['settings']['cpu_count']} shared CPU cores "
             f"(load average in the table), {out['settings']['eval_samples']} held-out samples of 129 tokens per "
             "domain for each perplexity.", "", table(out), "",
             "Change in perplexity against base after the continual arms:", "",
             "| arm | ppl A - base A (forgetting) | ppl B - base B (gain on B is negative) |", "|---|---:|---:|"]
    for arm in ARMS:
        r = out["continual"][arm]
        lines.append(f"| {arm} | {r['ppl_a'] - base['ppl_a']:+.2f} | {r['ppl_b'] - base['ppl_b']:+.2f} |")
    lines += ["", "![held-out perplexity against steps on B](experts_continual.png)", "",
              "![BTX and RRE](experts_btx_rre.png)", "", END]
    text = open(DOC, encoding="utf-8").read() if os.path.isfile(DOC) else f"# Pluggable experts\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(head + "\n".join(lines) + tail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", default=os.path.join(ROOT, "runs", "experts"))
    parser.add_argument("--eval_samples", type=int, default=96)
    parser.add_argument("--points", type=int, default=3, help="checkpoints scored per continual arm")
    args = parser.parse_args()
    out = Experiment(args.run_dir, args.eval_samples, args.points).run()
    out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    plot(out)
    write_doc(out)
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
