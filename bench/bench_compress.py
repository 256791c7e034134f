#!/usr/bin/env python
"""Every compression method on a tiny Mixtral trained for the purpose, side by side (docs/compression.md).

    source scripts/env.sh
    python bench/bench_compress.py [--work runs/compress] [--retrain] [--eval_samples 128]
    python bench/bench_compress.py --measure-speed [--repeats 20]   # only the timing columns, again

1. Tokenizes the bundled corpus (data/corpus) and the second domain (data/corpus_nt), each with its
   held-out split (scripts/preprocess_data.py --heldout_fraction 0.1: every 10th chapter, never trained on).
2. Trains configs/mixtral_tiny_cpu.yaml on data/corpus's training split (scripts/run_mixtral.py; skipped
   when a checkpoint exists) and exports the last checkpoint as a model folder.
3. Calibrates on the first 16k training tokens, then writes prune / merge at R = 6, 4, 2, densify, int8
   (per channel and groups of 32) and dynamic skipping with scripts/compress.py.
4. Measures each folder in its own processes: parameters, bytes on disk, held-out perplexity on the first
   --eval_samples held-out samples of each domain, the share of expert computations skipping drops there;
   then, separately, peak RSS while generating and decode tokens/s at batch 1 (graph mode, 64 new tokens
   after a 16-token prompt, median of --repeats, with the load average before and after).
A rerun measures only what is missing; --measure-speed redoes the timing of every folder (nothing is
retrained or recompressed), e.g. on an idle machine. Writes bench/results/compress.json and
docs/compression.png and prints the table (`--table` redraws both from the recorded results).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from _common import HELDOUT_FRACTION, run, split

YAML = os.path.join(ROOT, "configs", "mixtral_tiny_cpu.yaml")
DOMAINS = {"heldout_ppl": "corpus", "heldout_ppl_nt": "corpus_nt"}  # result key -> data/<corpus>
METHODS = [("baseline", None)] + [(f"{m}{r}", [m, "--keep", str(r)]) for r in (6, 4, 2) for m in ("prune", "merge")] \
    + [("densify", ["densify"]), ("int8", ["quantize", "--bits", "8"]),
       ("int8_g32", ["quantize", "--bits", "8", "--group_size", "32"]), ("skip", ["skip"])]


def prepare(work: str, retrain: bool) -> tuple:
    """Data splits, the trained model, its exported folder; returns the folder and {result key: held-out file}."""
    os.makedirs(work, exist_ok=True)
    heldout = {"heldout_ppl": split("corpus", os.path.join(work, "train.mindrecord")),
               "heldout_ppl_nt": split("corpus_nt", os.path.join(work, "nt.mindrecord"))}
    ckpt_dir = os.path.join(work, "tiny", "checkpoint", "rank_0")
    if retrain or not os.path.isdir(ckpt_dir):
        run([sys.executable, "scripts/run_mixtral.py", "--config", YAML, "--run_mode", "train", "--output_dir",
             os.path.join(work, "tiny"), "--train_dataset", os.path.join(work, "train.mindrecord")])
    ckpt = max((os.path.join(ckpt_dir, f) for f in os.listdir(ckpt_dir) if f.endswith(".ckpt")), key=os.path.getmtime)
    folder = os.path.join(work, "models", "baseline")
    if not os.path.isdir(folder):
        export(ckpt, folder)
    return folder, heldout


def export(ckpt: str, folder: str) -> None:
    """A training .ckpt -> a model folder (mixtral-ms layout, config.json, tokenizer) that from_pretrained and
    scripts/compress.py read."""
    from mixtral_ms.model.configuration import MixtralConfig
    from mixtral_ms.checkpoint.convert import MS_METADATA, json_files, open_tensors, write_checkpoint
    from mixtral_ms.checkpoint.view import CheckpointView
    from mixtral_ms.run.run_yaml import read_run_yaml
    fields = read_run_yaml(YAML)["model"]["model_config"]
    config = MixtralConfig(**{k: v for k, v in fields.items() if k != "type"})
    view = CheckpointView(open_tensors(ckpt), config, implied_by=YAML)
    items = [(name, "F32", spec.shape, view.array(name)) for name, spec in view.specs.items()]
    write_checkpoint(ckpt, folder, items, json_files({"config.json": config.to_hf_config()}),
                     os.path.join(ROOT, "data", "tokenizer"), metadata=MS_METADATA)


def held_out_rows(path: str, samples: int) -> list:
    import mindspore.dataset as ds
    return [r for (r,) in ds.MindDataset(path, columns_list=["input_ids"], shuffle=False)
            .create_tuple_iterator(num_epochs=1, output_numpy=True)][:samples]


def measure_quality(folder: str, heldout: dict, samples: int) -> dict:
    """In this process (PyNative): sizes, held-out perplexity of each domain, expert computations skipped."""
    import mindspore as ms
    from mindspore import Tensor
    from mixtral_ms import MixtralForCausalLM
    from mixtral_ms.tools.compress.algorithms import skipped_fraction
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    model = MixtralForCausalLM.from_pretrained(folder)
    model.set_train(False)
    config = model.config
    result = {}
    for key, path in heldout.items():
        rows = held_out_rows(path, samples)
        nll, tokens, skipped = 0.0, 0, []
        for start in range(0, len(rows), 8):
            ids = np.stack(rows[start:start + 8]).astype(np.int32)
            logits, router_logits, _, _ = model(Tensor(ids))
            logits = logits.asnumpy()[:, :-1].astype(np.float64)
            target = ids[:, 1:]
            peak = logits.max(-1, keepdims=True)
            logz = (peak[..., 0] + np.log(np.exp(logits - peak).sum(-1)))
            nll += float((logz - np.take_along_axis(logits, target[..., None], -1)[..., 0]).sum())
            tokens += target.size
            if config.dynamic_skip_betas:
                skipped.append([skipped_fraction(r, config.num_experts_per_tok, b)
                                for r, b in zip(router_logits.asnumpy(), config.dynamic_skip_betas)])
        result[key] = float(np.exp(nll / tokens))
        result[key.replace("ppl", "tokens")] = tokens
        if key == "heldout_ppl":
            result["expert_flops_saved_heldout"] = float(np.mean(skipped)) if skipped else 0.0
    params = sum(int(np.prod(p.shape)) for p in model.get_parameters())
    weight_bytes = sum(p.asnumpy().nbytes for p in model.get_parameters())
    disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    return {"experts_per_layer": config.num_local_experts, "top_k": config.num_experts_per_tok,
            "parameters": params, "weight_bytes_in_memory": weight_bytes, "bytes_on_disk": disk, **result}


def measure_speed(folder: str, prompt_source: str, repeats: int) -> dict:
    """In this process (graph mode): decode tokens/s at batch 1 (median of `repeats` after a compiling run) and
    peak RSS while generating, with the load average around the timing (the machine may be shared)."""
    import mindspore as ms
    from mixtral_ms import MixtralForCausalLM
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    model = MixtralForCausalLM.from_pretrained(folder)
    model.set_train(False)
    prompt = np.asarray(held_out_rows(prompt_source, 1)[0][:16], np.int32)[None]
    model.generate(prompt, max_new_tokens=64, eos_token_id=-1)  # compile
    load_before = os.getloadavg()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=64, eos_token_id=-1)
        times.append(time.perf_counter() - start)
    return {"decode_tokens_per_s": 64 / statistics.median(times), "decode_seconds": times,
            "decode_load_average": {"before": load_before, "after": os.getloadavg()},
            "decode_measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "peak_rss_mib_at_generation": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    base = results["baseline"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in results.items():
        left.scatter(r["bytes_on_disk"] / 2**20, r["heldout_ppl"], color="k" if name == "baseline" else None)
        left.annotate(name, (r["bytes_on_disk"] / 2**20, r["heldout_ppl"]), fontsize=8, xytext=(3, 3),
                      textcoords="offset points")
    left.set_xlabel("bytes on disk (MiB)")
    left.set_ylabel("held-out perplexity, corpus (log)")
    left.set_yscale("log")
    left.set_title("size vs quality (tiny Mixtral, 2 layers, 8 experts)")
    keep = [8, 6, 4, 2]
    for key, style, domain in (("heldout_ppl", "-", "corpus"), ("heldout_ppl_nt", ":", "corpus_nt")):
        for method, marker in (("prune", "o"), ("merge", "s")):
            ppl = [base[key]] + [results[f"{method}{r}"][key] for r in keep[1:]]
            right.plot(keep, ppl, marker + style, label=f"{method} ({domain})")
    right.axhline(results["densify"]["heldout_ppl"], color="grey", ls="--", label="densify (corpus)")
    right.invert_xaxis()
    right.set_xlabel("experts kept per layer (R)")
    right.set_ylabel("held-out perplexity (log)")
    right.set_yscale("log")
    right.set_title("prune vs merge at the same R")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: dict) -> str:
    """The markdown table of docs/compression.md."""
    base = results["baseline"]

    def ppl(r: dict, key: str) -> str:
        return f"{r[key]:.2f} ({100 * (r[key] / base[key] - 1):+.1f}%)"
    lines = ["| method | experts / layer | parameters | bytes on disk | peak RSS at generation | held-out ppl "
             "(corpus) | held-out ppl (corpus_nt) | decode tok/s (batch 1) | load avg at timing | "
             "expert FLOPs skipped |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        load = r["decode_load_average"]
        lines.append(
            f"| {name} | {r['experts_per_layer']} (top-{r['top_k']}) | {r['parameters'] / 1e6:.2f} M "
            f"({100 * r['parameters'] / base['parameters']:.0f}%) | {r['bytes_on_disk'] / 2**20:.2f} MiB "
            f"({100 * r['bytes_on_disk'] / base['bytes_on_disk']:.0f}%) | {r['peak_rss_mib_at_generation']:.0f} MiB "
            f"| {ppl(r, 'heldout_ppl')} | {ppl(r, 'heldout_ppl_nt')} | {r['decode_tokens_per_s']:.1f} "
            f"| {load['before'][0]:.1f} / {load['after'][0]:.1f} | {100 * r['expert_flops_saved_heldout']:.1f}% |")
    return "\n".join(lines)


def measured(path: str, cmd: list, again: bool = False) -> dict:
    """The JSON the last line of `cmd` (this script in a fresh process) prints, cached at `path`."""
    if again or not os.path.isfile(path):
        out = subprocess.run([sys.executable, __file__, *cmd], check=True, cwd=ROOT, capture_output=True,
                             text=True).stdout
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(out.strip().splitlines()[-1])
        os.replace(path + ".tmp", path)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.path.join(ROOT, "runs", "compress"))
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--eval_samples", type=int, default=128, help="held-out samples per domain (default 128)")
    parser.add_argument("--repeats", type=int, default=20, help="timed generations per model (median; default 20)")
    parser.add_argument("--measure-speed", dest="measure_speed", action="store_true",
                        help="time every model folder again (decode tok/s, peak RSS); nothing else is redone")
    parser.add_argument("--table", action="store_true", help="print the table and redraw the plot from the results")
    parser.add_argument("--quality", nargs=4, metavar=("FOLDER", "HELDOUT", "HELDOUT_NT", "SAMPLES"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--speed", nargs=3, metavar=("FOLDER", "PROMPTS", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    results_path = os.path.join(ROOT, "bench", "results", "compress.json")
    if args.table:
        with open(results_path, encoding="utf-8") as f:
            results = json.load(f)["results"]
        plot(results, os.path.join(ROOT, "docs", "compression.png"))
        print(table(results))
        return 0
    if args.quality:
        folder, a, b, samples = args.quality
        print(json.dumps(measure_quality(folder, {"heldout_ppl": a, "heldout_ppl_nt": b}, int(samples))))
        return 0
    if args.speed:
        folder, prompts, repeats = args.speed
        print(json.dumps(measure_speed(folder, prompts, int(repeats))))
        return 0
    work = os.path.abspath(args.work)
    if args.measure_speed and not os.path.isdir(os.path.join(work, "models", "baseline")):
        print(f"error: no model folders under {work}/models; run bench/bench_compress.py first", file=sys.stderr)
        return 2
    baseline, heldout = prepare(work, args.retrain)
    calib = os.path.join(work, "calibration.npz")
    if not os.path.isfile(calib):
        run([sys.executable, "scripts/compress.py", "calibrate", "--model", baseline, "--data",
             os.path.join(work, "train.mindrecord"), "--out", calib, "--max_tokens", "16384", "--batch_size", "16"])
    results = {}
    for name, cmd in METHODS:
        folder = baseline if cmd is None else os.path.join(work, "models", name)
        if cmd is not None and not os.path.isdir(folder):
            extra = [] if cmd[0] == "quantize" else ["--calibration", calib]
            run([sys.executable, "scripts/compress.py", *cmd, "--model", baseline, "--out", folder, *extra])
        quality = measured(os.path.join(work, "measured", f"{name}.{args.eval_samples}.json"),
                           ["--quality", folder, heldout["heldout_ppl"], heldout["heldout_ppl_nt"],
                            str(args.eval_samples)])
        speed = measured(os.path.join(work, "measured", f"{name}.speed.json"),
                         ["--speed", folder, heldout["heldout_ppl"], str(args.repeats)], again=args.measure_speed)
        results[name] = {**quality, **speed}
        print(name, results[name], flush=True)
    tmp = results_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"machine": os.uname().nodename, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                   "heldout_fraction": HELDOUT_FRACTION, "eval_samples": args.eval_samples,
                   "decode_repeats": args.repeats, "results": results}, f, indent=2)
    os.replace(tmp, results_path)
    plot(results, os.path.join(ROOT, "docs", "compression.png"))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
