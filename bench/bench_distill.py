#!/usr/bin/env python
"""How much of the sparse model's quality gain distillation keeps in a dense student (Switch Transformer's
measurement, docs/compression.md "Distillation into the dense model").

    source scripts/env.sh
    python bench/bench_distill.py [--epochs 1] [--work runs/distill_1ep]

Every run is the user's command (scripts/run_mixtral.py, scripts/compress.py) on the bundled corpus,
tokenized once with a held-out split of whole chapters (scripts/preprocess_data.py --heldout_fraction),
each trained for the same steps (--epochs of the training split) with the same data order:
1. teacher: configs/mixtral_tiny_cpu.yaml (8 experts, top-2) trained from scratch;
2. dense: configs/compress/dense_tiny_cpu.yaml (the student's size: one expert) trained from scratch;
3. distilled: configs/compress/distill_dense_tiny.yaml, the same student with the frozen teacher,
   initialised as the dense baseline (same seed);
4. densified: the teacher exported, calibrated and densified (scripts/compress.py densify), untrained;
5. distilled_from_densified: (3) starting from (4);
6. dense_seed1, distilled_seed1: (2) and (3) with seed 1 (initialisation and data order): the seed-to-seed
   spread the gains are read against, and distillation's gain on a second seed.
Each is then scored on the first --eval_samples held-out samples (run_mixtral.py --run_mode eval). A rerun
does only what is missing. Writes the run under its epochs in bench/results/distill.json and prints the
tables (`--table` reprints them). """
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import yaml

from _common import HELDOUT_FRACTION, run, split
from bench_compress import export
from mixtral_ms import ROOT
from mixtral_ms.run.run_yaml import read_run_yaml

TEACHER_YAML = os.path.join(ROOT, "configs", "mixtral_tiny_cpu.yaml")
DENSE_YAML = os.path.join(ROOT, "configs", "compress", "dense_tiny_cpu.yaml")
DISTILL_YAML = os.path.join(ROOT, "configs", "compress", "distill_dense_tiny.yaml")
RESULTS = os.path.join(ROOT, "bench", "results", "distill.json")


def newest_checkpoint(run_dir: str) -> str:
    folder = os.path.join(run_dir, "checkpoint", "rank_0")
    return max((os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".ckpt")), key=os.path.getmtime)


def train(work: str, name: str, config: str, epochs: int, load: str = None) -> str:
    """run_mixtral.py --run_mode train into work/name (skipped when it finished before); its last checkpoint."""
    out = os.path.join(work, name)
    done = os.path.join(out, "done")
    if not os.path.isfile(done):
        cmd = [sys.executable, "scripts/run_mixtral.py", "--config", config, "--run_mode", "train", "--output_dir",
               out, "--train_dataset", os.path.join(work, "train.mindrecord"), "--epochs", str(epochs)]
        with open(os.path.join(work, f"{name}.log"), "w", encoding="utf-8") as log:
            run(cmd + (["--load_checkpoint", load] if load else []), stdout=log, stderr=subprocess.STDOUT)
        open(done, "w").close()
    return newest_checkpoint(out)


def derived_config(work: str, name: str, base: str, changes: dict) -> str:
    """A shipped YAML with `changes` on top (MindFormers merges this file over it: base_config)."""
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump({"base_config": base, **changes}, f)
    return path


def evaluate(work: str, name: str, config: str, checkpoint: str, samples: int) -> dict:
    path = os.path.join(work, "eval", f"{name}.json")
    if not os.path.isfile(path):
        run([sys.executable, "scripts/run_mixtral.py", "--config", config, "--run_mode", "eval", "--load_checkpoint",
             checkpoint, "--eval_dataset", os.path.join(work, "train_heldout.mindrecord"), "--eval_samples",
             str(samples), "--eval_output", path, "--output_dir", os.path.join(work, "eval", name)])
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def kd_log(work: str, name: str) -> dict:
    """First and last logged CE and KD terms of a distillation run (router_stats.jsonl)."""
    with open(os.path.join(work, name, "router_stats.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return {"steps": records[-1]["step"], "first": {k: records[0][k] for k in ("loss", "ce_loss", "kd_loss")},
            "last": {k: records[-1][k] for k in ("loss", "ce_loss", "kd_loss")}}


def fractions(results: dict, student: str) -> dict:
    """The share of the teacher's gain over the dense baseline the student keeps, in log-perplexity (per-token
    CE, Switch Transformer's quality measure) and in perplexity; None where the teacher gained nothing."""
    dense, teacher, got = results["dense"], results["teacher"], results[student]
    if teacher["ce"] >= dense["ce"]:
        return None
    return {"log_ppl": (dense["ce"] - got["ce"]) / (dense["ce"] - teacher["ce"]),
            "ppl": (dense["ppl"] - got["ppl"]) / (dense["ppl"] - teacher["ppl"])}


def seed_mean_fraction(results: dict) -> dict:
    """With both seeds of the dense and distilled arms: the gain kept by the seed means (log ppl), and the
    range over the pairings of a distilled run with its own seed's baseline."""
    if "distilled_seed1" not in results:
        return None
    dense = [results["dense"]["ce"], results["dense_seed1"]["ce"]]
    distilled = [results["distilled"]["ce"], results["distilled_seed1"]["ce"]]
    teacher = results["teacher"]["ce"]
    paired = [(d - s) / (d - teacher) for d, s in zip(dense, distilled)]
    return {"log_ppl_of_means": (sum(dense) - sum(distilled)) / (sum(dense) - 2 * teacher),
            "log_ppl_per_seed": paired, "distillation_gain_per_seed": [d - s for d, s in zip(dense, distilled)]}


def table(record: dict) -> str:
    results = record["results"]
    lines = [f"{record['steps']} steps ({record['epochs']} epoch(s)), held-out: {record['eval_samples']} samples",
             "", "| model | trained | held-out CE (log ppl) | held-out ppl | gain kept (log ppl) | gain kept (ppl) |",
             "|---|---|---|---|---|---|"]
    steps = record["steps"]
    for name, what in (("dense", "from scratch"), ("dense_seed1", "from scratch, seed 1"),
                       ("teacher", "from scratch"), ("densified", "the teacher densified, not trained"),
                       ("distilled", "distilled, the dense baseline's init"),
                       ("distilled_seed1", "distilled, the seed-1 baseline's init, seed 1"),
                       ("distilled_from_densified", "distilled from the densified teacher")):
        if name not in results:  # recorded before the bench measured it
            continue
        r = results[name]
        kept = record["fractions"].get(name)
        no_gain = name in record["fractions"] and kept is None
        cells = (f"{100 * kept['log_ppl']:.1f}%", f"{100 * kept['ppl']:.1f}%") if kept else \
            ("n/a: no teacher gain",) * 2 if no_gain else ("", "")
        what = what if name == "densified" else f"{steps} steps {what}"
        lines.append(f"| {name} | {what} | {r['ce']:.4f} | {r['ppl']:.2f} | {cells[0]} | {cells[1]} |")
    both = record.get("seed_mean_fraction")
    if both:
        lines += ["", f"Gain kept by the two seeds' means (log ppl): {100 * both['log_ppl_of_means']:.1f}% (per seed, "
                      f"against that seed's baseline: {', '.join(f'{100 * f:.1f}%' for f in both['log_ppl_per_seed'])})"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="the runs' folder (default runs/distill_<epochs>ep)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the training split, for every model")
    parser.add_argument("--eval_samples", type=int, default=128)
    parser.add_argument("--table", action="store_true", help="print the table from bench/results/distill.json")
    args = parser.parse_args(argv)
    runs = {}
    if os.path.isfile(RESULTS):
        with open(RESULTS, encoding="utf-8") as f:
            runs = json.load(f)["runs"]
    if args.table:
        print("\n\n".join(table(record) for _, record in sorted(runs.items())))
        return 0
    work = os.path.abspath(args.work or os.path.join(ROOT, "runs", f"distill_{args.epochs}ep"))
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "train.mindrecord")
    split("corpus", data)
    teacher = train(work, "teacher", TEACHER_YAML, args.epochs)
    dense = train(work, "dense", DENSE_YAML, args.epochs)
    distill = derived_config(work, "distill", DISTILL_YAML, {"runner_wrapper": {"distill": {"teacher": teacher}}})
    distilled = train(work, "distilled", distill, args.epochs)
    teacher_folder, densified = os.path.join(work, "models", "teacher"), os.path.join(work, "models", "densified")
    if not os.path.isdir(teacher_folder):
        export(teacher, teacher_folder)
    calibration = os.path.join(work, "models", "teacher.calibration.npz")
    if not os.path.isfile(calibration):
        run([sys.executable, "scripts/compress.py", "calibrate", "--model", teacher_folder, "--data", data,
             "--out", calibration, "--max_tokens", "16384", "--batch_size", "16"])
    if not os.path.isdir(densified):
        run([sys.executable, "scripts/compress.py", "densify", "--model", teacher_folder, "--calibration",
             calibration, "--out", densified])
    from_densified = train(work, "distilled_from_densified", distill, args.epochs, load=densified)
    dense_seed1 = train(work, "dense_seed1", derived_config(work, "dense_seed1", DENSE_YAML, {"seed": 1}), args.epochs)
    distilled_seed1 = train(work, "distilled_seed1", derived_config(
        work, "distill_seed1", DISTILL_YAML, {"seed": 1, "runner_wrapper": {"distill": {"teacher": teacher}}}),
        args.epochs)

    results = {"teacher": evaluate(work, "teacher", TEACHER_YAML, teacher, args.eval_samples),
               "dense": evaluate(work, "dense", DENSE_YAML, dense, args.eval_samples),
               "dense_seed1": evaluate(work, "dense_seed1", DENSE_YAML, dense_seed1, args.eval_samples),
               "densified": evaluate(work, "densified", DENSE_YAML, densified, args.eval_samples),
               "distilled": evaluate(work, "distilled", DENSE_YAML, distilled, args.eval_samples),
               "distilled_seed1": evaluate(work, "distilled_seed1", DENSE_YAML, distilled_seed1, args.eval_samples),
               "distilled_from_densified": evaluate(work, "distilled_from_densified", DENSE_YAML, from_densified,
                                                    args.eval_samples)}
    settings = read_run_yaml(DISTILL_YAML)["runner_wrapper"]["distill"]
    record = {"steps": kd_log(work, "distilled")["steps"], "epochs": args.epochs,
              "distill": {k: settings[k] for k in ("ce_coef", "kd_coef", "temperature")},
              "heldout_fraction": HELDOUT_FRACTION, "eval_samples": args.eval_samples, "results": results,
              "fractions": {name: fractions(results, name) for name in ("densified", "distilled",
                                                                         "distilled_from_densified")},
              "seed_mean_fraction": seed_mean_fraction(results),
              "kd_terms": {name: kd_log(work, name) for name in ("distilled", "distilled_from_densified")},
              "machine": os.uname().nodename, "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    runs[str(args.epochs)] = record
    tmp = RESULTS + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"runs": runs}, f, indent=2)
    os.replace(tmp, RESULTS)
    print(table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
