#!/usr/bin/env python
"""Every compression method on a tiny Mixtral trained for the purpose, side by side (docs/compression.md).

    source scripts/env.sh
    python bench/bench_compress.py [--work runs/compress] [--retrain]

1. Splits the bundled corpus: the first 228 chapters train, the last 8 (Judges 18-21, Ruth 1-4) are held
   out (until the project ships held-out splits), and tokenizes both (scripts/preprocess_data.py).
2. Trains configs/mixtral_tiny_cpu.yaml on the training split (scripts/run_mixtral.py; skipped when a
   checkpoint exists) and exports the last checkpoint as a model folder.
3. Calibrates on the first 16k training tokens, then writes prune / merge at R = 6, 4, 2, densify, int8
   (per channel and groups of 32) and dynamic skipping with scripts/compress.py.
4. Measures each folder in its own process: parameters, bytes on disk, held-out perplexity, peak RSS while
   generating, decode tokens/s at batch 1 (graph mode, 64 new tokens after a 16-token prompt, median of 3),
   and for skipping the share of expert computations dropped on the held-out text.
Writes bench/results/compress.json and docs/compression.png and prints the table (`--table` redraws both
from the recorded results). Timings on a shared machine are indicative.
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
sys.path.insert(0, ROOT)

YAML = os.path.join(ROOT, "configs", "mixtral_tiny_cpu.yaml")
CORPUS = os.path.join(ROOT, "data", "corpus", "kjv_genesis_to_ruth.txt")
HELD_OUT_CHAPTERS = 8
METHODS = [("baseline", None)] + [(f"{m}{r}", [m, "--keep", str(r)]) for r in (6, 4, 2) for m in ("prune", "merge")] \
    + [("densify", ["densify"]), ("int8", ["quantize", "--bits", "8"]),
       ("int8_g32", ["quantize", "--bits", "8", "--group_size", "32"]), ("skip", ["skip"])]


def run(cmd, **kwargs):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)


def prepare(work: str, retrain: bool) -> str:
    """Data splits, the trained model, its exported folder; returns the folder."""
    text = os.path.join(work, "text")
    os.makedirs(text, exist_ok=True)
    with open(CORPUS, encoding="utf-8") as f:
        chapters = f.read().splitlines()
    for name, lines in (("train", chapters[:-HELD_OUT_CHAPTERS]), ("heldout", chapters[-HELD_OUT_CHAPTERS:])):
        with open(os.path.join(text, f"{name}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        run([sys.executable, "scripts/preprocess_data.py", "--input", os.path.join(text, f"{name}.txt"), "--format",
             "text", "--seq_length", "128", "--output", os.path.join(work, f"{name}.mindrecord"), "--overwrite"])
    ckpt_dir = os.path.join(work, "tiny", "checkpoint", "rank_0")
    if retrain or not os.path.isdir(ckpt_dir):
        run([sys.executable, "scripts/run_mixtral.py", "--config", YAML, "--run_mode", "train", "--output_dir",
             os.path.join(work, "tiny"), "--train_dataset", os.path.join(work, "train.mindrecord")])
    ckpt = max((os.path.join(ckpt_dir, f) for f in os.listdir(ckpt_dir) if f.endswith(".ckpt")), key=os.path.getmtime)
    folder = os.path.join(work, "models", "baseline")
    if not os.path.isdir(folder):
        export(ckpt, folder)
    return folder


def export(ckpt: str, folder: str) -> None:
    """A training .ckpt -> a model folder (mixtral-ms layout, config.json, tokenizer) that from_pretrained and
    scripts/compress.py read."""
    import yaml
    import mindspore as ms
    from mixtral_ms.configuration import MixtralConfig
    from mixtral_ms.convert import MS_METADATA, write_checkpoint
    from mixtral_ms.name_map import parameter_specs
    with open(YAML, encoding="utf-8") as f:
        fields = yaml.safe_load(f)["model"]["model_config"]
    config = MixtralConfig(**{k: v for k, v in fields.items() if k != "type"})
    state = ms.load_checkpoint(ckpt)
    items = [(name, "F32", spec.shape, state[name].asnumpy().astype(np.float32))
             for name, spec in parameter_specs(config).items()]

    def write_config(tmp: str) -> None:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config.to_hf_config(), f, indent=2)
    write_checkpoint(ckpt, folder, items, write_config, os.path.join(ROOT, "data", "tokenizer"), metadata=MS_METADATA)


def measure(folder: str, heldout: str) -> dict:
    """In this process: decode speed and peak RSS while generating (graph mode), then held-out perplexity
    (PyNative)."""
    import mindspore as ms
    import mindspore.dataset as ds
    from mindspore import Tensor
    from mixtral_ms import MixtralForCausalLM
    from mixtral_ms.compress.algorithms import skipped_fraction
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    model = MixtralForCausalLM.from_pretrained(folder)
    model.set_train(False)
    config = model.config
    rows = [r for (r,) in ds.MindDataset(heldout, columns_list=["input_ids"], shuffle=False)
            .create_tuple_iterator(num_epochs=1, output_numpy=True)]
    prompt = np.asarray(rows[0][:16], np.int32)[None]
    model.generate(prompt, max_new_tokens=64, eos_token_id=-1)  # compile
    times = []
    for _ in range(3):
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=64, eos_token_id=-1)
        times.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    ms.set_context(mode=ms.PYNATIVE_MODE)
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
    params = sum(int(np.prod(p.shape)) for p in model.get_parameters())
    weight_bytes = sum(p.asnumpy().nbytes for p in model.get_parameters())
    disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    return {"experts_per_layer": config.num_local_experts, "top_k": config.num_experts_per_tok,
            "parameters": params, "weight_bytes_in_memory": weight_bytes, "bytes_on_disk": disk,
            "heldout_tokens": tokens, "heldout_ppl": float(np.exp(nll / tokens)),
            "decode_tokens_per_s": 64 / statistics.median(times),
            "peak_rss_mib_at_generation": peak_rss,
            "expert_flops_saved_heldout": float(np.mean(skipped)) if skipped else 0.0}


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
    left.set_ylabel("held-out perplexity (log)")
    left.set_yscale("log")
    left.set_title("size vs quality (tiny Mixtral, 2 layers, 8 experts)")
    for method, marker in (("prune", "o-"), ("merge", "s-")):
        keep = [8, 6, 4, 2]
        ppl = [base["heldout_ppl"]] + [results[f"{method}{r}"]["heldout_ppl"] for r in keep[1:]]
        right.plot(keep, ppl, marker, label=method)
    right.axhline(results["densify"]["heldout_ppl"], color="grey", ls="--", label="densify (1 expert)")
    right.invert_xaxis()
    right.set_xlabel("experts kept per layer (R)")
    right.set_ylabel("held-out perplexity (log)")
    right.set_yscale("log")
    right.set_title("prune vs merge at the same R")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: dict) -> str:
    """The markdown table of docs/compression.md."""
    base = results["baseline"]
    lines = ["| method | experts / layer | parameters | bytes on disk | peak RSS at generation | held-out ppl "
             "| decode tok/s (batch 1) | expert FLOPs skipped |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['experts_per_layer']} (top-{r['top_k']}) | {r['parameters'] / 1e6:.2f} M "
            f"({100 * r['parameters'] / base['parameters']:.0f}%) | {r['bytes_on_disk'] / 2**20:.2f} MiB "
            f"({100 * r['bytes_on_disk'] / base['bytes_on_disk']:.0f}%) | {r['peak_rss_mib_at_generation']:.0f} MiB "
            f"| {r['heldout_ppl']:.2f} ({100 * (r['heldout_ppl'] / base['heldout_ppl'] - 1):+.1f}%) "
            f"| {r['decode_tokens_per_s']:.1f} | {100 * r['expert_flops_saved_heldout']:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.path.join(ROOT, "runs", "compress"))
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the table and redraw the plot from the results")
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "HELDOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    results_path = os.path.join(ROOT, "bench", "results", "compress.json")
    if args.table:
        with open(results_path, encoding="utf-8") as f:
            results = json.load(f)["results"]
        plot(results, os.path.join(ROOT, "docs", "compression.png"))
        print(table(results))
        return 0
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0
    work = os.path.abspath(args.work)
    baseline = prepare(work, args.retrain)
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
        measured = os.path.join(work, "measured", f"{name}.json")  # a rerun measures only what is missing
        if not os.path.isfile(measured):
            out = subprocess.run([sys.executable, __file__, "--measure", folder,
                                  os.path.join(work, "heldout.mindrecord")],
                                 check=True, cwd=ROOT, capture_output=True, text=True).stdout
            os.makedirs(os.path.dirname(measured), exist_ok=True)
            with open(measured + ".tmp", "w", encoding="utf-8") as f:
                f.write(out.strip().splitlines()[-1])
            os.replace(measured + ".tmp", measured)
        with open(measured, encoding="utf-8") as f:
            results[name] = json.load(f)
        print(name, results[name], flush=True)
    path = results_path
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"machine": os.uname().nodename, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                   "results": results}, f, indent=2)
    os.replace(tmp, path)
    plot(results, os.path.join(ROOT, "docs", "compression.png"))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
