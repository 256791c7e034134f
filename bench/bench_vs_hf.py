#!/usr/bin/env python
"""mixtral-ms against Hugging Face `MixtralForCausalLM` (PyTorch, CPU) on one config, seed and thread count.

    source scripts/env.sh
    python bench/bench_vs_hf.py [--hf-python ~/.cache/mixtral-ms/devref/bin/python] [--repeats 5]

Measures training steps (forward with the load-balancing loss, backward, clipping to global norm 1,
AdamW: what MixtralTrainOneStepCell does, asked of HF too), prefill, decode at batch 1 and 8 with a KV cache,
and the MoE layer alone (training mode at capacity 1.1, and the dropless eval path) against a dense
SwiGLU FFN with the same active parameters (intermediate k*F), and MindFormers' Trainer on the same
config (scripts/run_mixtral.py, as users train) beside the bare training step.
Each row also gets its fraction of this machine's limit, measured in the same run: compute-bound rows
(training, prefill) FLOP/s over MindSpore's own MatMul rate on the bench's matmul shapes (torch's rate on
the same shapes is recorded beside it: HF's rows are bounded by that one, not MindSpore's); decode rows
tokens/s over (memory read bandwidth / bytes one token must read: the weights of the layers and of the
experts routed to, and the filled KV cache). The machine (CPU model, cores) is recorded with the results.
HF runs in a separate interpreter that has torch and transformers (`--hf-python`); without one, HF is
skipped. Medians of `--repeats` runs; writes bench/results/vs_hf.json, the table of docs/performance.md
(bench/results/vs_hf.md) and docs/performance.png.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = dict(vocab_size=8000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
              rope_theta=1e6, rms_norm_eps=1e-5)
SEQ, BATCH, DECODE_STEPS, PROMPT = 256, 4, 16, 32
THREADS = 2


def flops_per_token(cfg: dict, seq: int) -> float:
    """Forward FLOPs per token of the active path (2 per multiply-add), attention included."""
    h, f, v, k = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_experts_per_tok"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    per_layer = 2 * (h * h * 2 + 2 * h * kv) + 2 * k * 3 * h * f + 2 * h * cfg["num_local_experts"]
    per_layer += 2 * 2 * seq * h  # scores and weighted values, averaged over a causal sequence (~seq/2 keys x2)
    return cfg["num_hidden_layers"] * per_layer + 2 * h * v


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(calls: dict, repeats: int) -> dict:
    """name -> the seconds of each of `repeats` rounds, every round calling each in turn (after one warm-up
    call each): a change of load during the run moves all of them alike, where back-to-back medians of
    one call and then the next took it as a difference between them (up to 2x on this VM)."""
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def machine() -> dict:
    """What the figures were measured on."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import mindspore
    return {"cpu": model, "logical_cpus": os.cpu_count(), "threads": THREADS, "system": platform.platform(),
            "python": platform.python_version(), "mindspore": mindspore.__version__, "numpy": np.__version__}


def matmul_shapes(cfg: dict, tokens: int) -> list:
    """(M, K, N, count) of the forward's matmuls over `tokens` tokens, experts at their mean load."""
    h, f, v, e, k = (cfg[n] for n in ("hidden_size", "intermediate_size", "vocab_size", "num_local_experts",
                                      "num_experts_per_tok"))
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    rows, layers = tokens * k // e, cfg["num_hidden_layers"]
    return [(tokens, h, h, 2 * layers), (tokens, h, kv, 2 * layers), (rows, h, f, 2 * e * layers),
            (rows, f, h, e * layers), (tokens, h, v, 1)]


def matmuls(weights: list):
    """A graph of `a @ w.T` for each weight (distinct Parameters, as in the model's graph), each reduced to
    its first element: one graph call times many matmuls without a launch each. Not `.sum()`: MindSpore's
    CPU ReduceSum over a [1024, 2048] product took as long as the matmul, which halved the "limit"."""
    from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

    class Matmuls(nn.Cell):
        def __init__(self):
            super().__init__()
            self.mm = ops.MatMul(transpose_b=True)
            self.weights = ParameterTuple(Parameter(Tensor(w), name=f"w{i}") for i, w in enumerate(weights))

        def construct(self, a):
            total = 0.0
            for w in self.weights:
                total = total + self.mm(a, w)[0, 0]
            return total

    return Matmuls()


def matmul_limit(repeats: int) -> float:
    """MindSpore's own float32 MatMul rate (graph mode, x W^T as the model runs it) on the bench's shapes:
    their FLOPs over the time the matmuls alone take. Each shape runs as one graph of its `count` matmuls
    (`matmuls`): one matmul per call would add a graph launch (about a millisecond of host time) to each,
    which at these sizes is up to half the matmul and halves the rate."""
    import mindspore as ms
    from mindspore import Tensor

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    rng = np.random.default_rng(0)
    flops = seconds = 0.0
    for m, kdim, n, count in matmul_shapes(CONFIG, BATCH * SEQ):
        a = Tensor(rng.random((m, kdim), dtype=np.float32))
        cell = matmuls([rng.random((n, kdim), dtype=np.float32) for _ in range(count)])
        t = median_time(lambda: cell(a).asnumpy(), repeats, warmup=2)
        flops, seconds = flops + 2 * m * kdim * n * count, seconds + t
    return flops / seconds


def read_bandwidth(repeats: int, size: int = 1 << 27) -> float:
    """Bytes/s a THREADS-way read (numpy sum) reaches over a 512 MB float32 array, larger than caches."""
    parts = np.array_split(np.ones(size, np.float32), THREADS)
    with ThreadPoolExecutor(THREADS) as pool:
        t = median_time(lambda: list(pool.map(np.sum, parts)), repeats)
    return 4 * size / t


def decode_bytes_per_token(cfg: dict, batch: int) -> float:
    """Bytes one decode step must read, per token: every layer's attention and router weights, the experts
    routed to (expected distinct experts of `batch` tokens under uniform routing: E (1 - (1 - k/E)^batch)),
    the LM head and the filled KV cache (mean over the bench's decode steps), in float32."""
    h, f, v, e, k, layers = (cfg[n] for n in ("hidden_size", "intermediate_size", "vocab_size", "num_local_experts",
                                              "num_experts_per_tok", "num_hidden_layers"))
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    experts = e * (1 - (1 - k / e) ** batch)
    weights = layers * (2 * h * h + 2 * h * kv + e * h + experts * 3 * h * f) + v * h
    filled = PROMPT + (DECODE_STEPS + 1) / 2
    cache = layers * 2 * batch * filled * kv
    return 4 * (weights + cache) / batch


class OurRows:
    """The bench model (graph mode, seed 0, capacity 1.1 in training) and the work of each row, one call
    each: `train()` one MixtralTrainOneStepCell step, `prefill()` one eval forward of [BATCH, SEQ],
    `generate(b, n)` greedy decoding of n new tokens after a PROMPT-token prompt at batch b (the decode
    rows time n = DECODE_STEPS + 1 minus n = 1), `moe_layer(training)` and `dense_ffn()` one layer on
    [BATCH, SEQ] hidden states. bench/profile_vs_hf.py profiles the same calls."""

    def __init__(self) -> None:
        import mindspore as ms
        from mindspore import Tensor
        from mixtral_ms import MixtralConfig, MixtralForCausalLM
        ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
        ms.set_seed(0)
        self.model = MixtralForCausalLM(MixtralConfig(**CONFIG, capacity_factor=1.1))
        self.rng = np.random.default_rng(0)
        self.ids = Tensor(self.rng.integers(0, CONFIG["vocab_size"], (BATCH, SEQ)).astype(np.int32))
        self.prompts = {b: self.rng.integers(0, CONFIG["vocab_size"], (b, PROMPT)).astype(np.int32) for b in (1, 8)}
        self.x = Tensor(self.rng.normal(size=(BATCH, SEQ, CONFIG["hidden_size"])).astype(np.float32))
        self.mask = Tensor(np.ones((BATCH, SEQ), np.float32))
        self.dense = dense_ffn(self.rng)

    @functools.cached_property
    def step(self):
        """Built on first use (its moments are twice the weights; the decode and layer rows never train).
        The Trainer's optimizer work: decoupled weight decay (0.01, torch AdamW's default, HF's side too) on
        the matrices, grouped as MindFormers groups them (none on the 1-D norms); the shipped YAML's betas, eps."""
        from mixtral_ms.run.optim import FusedAdamW
        from mixtral_ms.run.wrapper import MixtralTrainOneStepCell
        from mindformers.trainer.optimizer_grouped_parameters import get_optimizer_grouped_parameters
        groups = get_optimizer_grouped_parameters(self.model, weight_decay=0.01)
        return MixtralTrainOneStepCell(self.model, FusedAdamW(groups, learning_rate=1e-4, betas=(0.9, 0.95), eps=1e-8))

    def train(self) -> None:
        self.model.set_train(True)
        self.step(self.ids)[0].asnumpy()

    def prefill(self) -> None:
        self.model.set_train(False)
        self.model(self.ids)[0].asnumpy()

    def generate(self, batch: int, new_tokens: int) -> None:
        self.model.set_train(False)
        self.model.generate(self.prompts[batch], max_new_tokens=new_tokens, eos_token_id=-1)

    def moe_layer(self, training: bool) -> None:
        """Layer 0's MoE block on [BATCH, SEQ] hidden states: capacity 1.1 (training) or dropless (eval)."""
        block = self.model.model.layers[0].block_sparse_moe
        block.set_train(training)
        block(self.x, self.mask)[0].asnumpy()

    def dense_ffn(self) -> None:
        self.dense(self.x).asnumpy()


def dense_ffn(rng):
    """SwiGLU with intermediate k*F: the active parameters of the MoE layer."""
    import mindspore as ms
    from mindspore import Tensor, nn, ops
    f, h = CONFIG["num_experts_per_tok"] * CONFIG["intermediate_size"], CONFIG["hidden_size"]

    class Dense(nn.Cell):
        def __init__(self):
            super().__init__()
            self.w1 = ms.Parameter(Tensor(rng.normal(size=(f, h)).astype(np.float32) * 0.02))
            self.w3 = ms.Parameter(Tensor(rng.normal(size=(f, h)).astype(np.float32) * 0.02))
            self.w2 = ms.Parameter(Tensor(rng.normal(size=(h, f)).astype(np.float32) * 0.02))
            self.mm = ops.MatMul(transpose_b=True)

        def construct(self, x):
            flat = x.reshape(-1, x.shape[-1])
            return self.mm(ops.silu(self.mm(flat, self.w1)) * self.mm(flat, self.w3), self.w2)

    return Dense()


def bench_ours(repeats: int, rows: "OurRows") -> dict:
    out = {}
    # compile, then one step more, as the Trainer row skips its first two steps
    out["train_tokens_per_s"] = BATCH * SEQ / median_time(rows.train, repeats, warmup=2)
    out["prefill_tokens_per_s"] = BATCH * SEQ / median_time(rows.prefill, repeats)
    for b in (1, 8):
        rows.generate(b, 2)  # compile prefill and decode graphs
        t_prefill = median_time(lambda: rows.generate(b, 1), repeats)
        t_all = median_time(lambda: rows.generate(b, DECODE_STEPS + 1), repeats)
        out[f"decode_b{b}_tokens_per_s"] = b * DECODE_STEPS / max(t_all - t_prefill, 1e-9)

    times = interleaved({"moe_layer": lambda: rows.moe_layer(True), "dense_ffn": rows.dense_ffn,
                         "moe_layer_eval": lambda: rows.moe_layer(False)}, repeats)
    for name, ts in times.items():
        out[f"{name}_ms"] = 1e3 * statistics.median(ts)
    # ratios per round (each round times the three in turn), so load drift over the run cancels
    out["moe_over_dense"] = statistics.median(m / d for m, d in zip(times["moe_layer"], times["dense_ffn"]))
    out["moe_eval_over_dense"] = statistics.median(m / d for m, d in zip(times["moe_layer_eval"], times["dense_ffn"]))
    return out


def bench_trainer(steps: int) -> dict:
    """MindFormers' Trainer as users run it (scripts/run_mixtral.py --run_mode train, the shipped tiny YAML
    with the bench's model config): samples of SEQ tokens, so each step does the bare step's work, plus
    the dataset pipeline and callbacks. tokens/s is MixtralProgressMonitor's per-step rate, median over
    the steps after the first two (compile, warm-up)."""
    import yaml
    from mixtral_ms.run.data import PRETRAIN_COLUMNS, write_mindrecord
    with open(os.path.join(ROOT, "configs", "mixtral_tiny_cpu.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        rng = np.random.default_rng(0)
        data = os.path.join(tmp, "train.mindrecord")
        write_mindrecord(data, PRETRAIN_COLUMNS, ({"input_ids": rng.integers(0, CONFIG["vocab_size"], SEQ)
                                                   .astype(np.int32)} for _ in range(BATCH * (steps + 2))))
        config["output_dir"] = os.path.join(tmp, "run")
        config["runner_config"].update(epochs=1, batch_size=BATCH)
        config["train_dataset"].update(batch_size=BATCH)
        config["train_dataset"]["data_loader"].update(dataset_dir=data, shuffle=False)
        config["train_dataset_task"]["dataset_config"] = config["train_dataset"]
        config["model"]["model_config"] = {"type": "MixtralConfig", **CONFIG, "capacity_factor": 1.1,
                                           "seq_length": SEQ - 1}
        config["callbacks"] = [{"type": "MixtralProgressMonitor", "log_interval": 1}]
        path = os.path.join(tmp, "bench.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f)
        env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_mixtral.py"), "--config", path,
                               "--run_mode", "train"], capture_output=True, text=True, env=env, cwd=tmp)
    if proc.returncode != 0:
        raise SystemExit(f"Trainer benchmark failed: {proc.stderr.strip().splitlines()[-1:]}")
    rates = [float(m.replace(",", "")) for m in re.findall(r"\| ([\d,.]+) tokens/s", proc.stdout)]
    if len(rates) < 2:
        raise SystemExit(f"Trainer benchmark: no per-step rates in its output:\n{proc.stdout[-2000:]}")
    return {"trainer_tokens_per_s": statistics.median(rates[1:])}


# HF's side of OurRows: the same model config, seed, inputs and calls (train / prefill / gen), for the
# workers below and bench/profile_vs_hf.py. argv[1]: JSON [cfg, seq, batch, steps, prompt_len, threads, ...].
HF_ROWS = r'''
import json, statistics, sys, time
import numpy as np, torch
from transformers import MixtralConfig, MixtralForCausalLM
cfg, seq, batch, steps, prompt_len, threads, *extra = json.loads(sys.argv[1])
torch.set_num_threads(threads); torch.manual_seed(0)
model = MixtralForCausalLM(MixtralConfig(**cfg, attn_implementation="sdpa", output_router_logits=True))
rng = np.random.default_rng(0)
ids = torch.tensor(rng.integers(0, cfg["vocab_size"], (batch, seq)))
prompts = {b: torch.tensor(rng.integers(0, cfg["vocab_size"], (b, prompt_len))) for b in (1, 8)}
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
def train():  # the work of MixtralTrainOneStepCell: loss, backward, clip to global norm 1, AdamW
    model.train(); opt.zero_grad(); model(input_ids=ids, labels=ids).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
def prefill():
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
def gen(b, n):
    model.eval()
    with torch.no_grad():
        model.generate(prompts[b], max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
'''

HF_WORKER = HF_ROWS + r'''
repeats, shapes = extra
def med(fn):
    fn(); ts = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
out = {"train_tokens_per_s": batch * seq / med(train), "prefill_tokens_per_s": batch * seq / med(prefill)}
for b in (1, 8):
    t1 = med(lambda: gen(b, 1)); tn = med(lambda: gen(b, steps + 1))
    out[f"decode_b{b}_tokens_per_s"] = b * steps / max(tn - t1, 1e-9)
model.eval()
with torch.no_grad():
    x = torch.randn(batch, seq, cfg["hidden_size"])
    moe = model.model.layers[0].mlp if hasattr(model.model.layers[0], "mlp") else model.model.layers[0].block_sparse_moe
    out["moe_layer_ms"] = 1e3 * med(lambda: moe(x))
flops = seconds = 0.0  # torch's float32 matmul rate (x W^T) on the shapes MindSpore's limit is measured on
for m, kdim, n, count in shapes:
    a = torch.rand(m, kdim); ws = [torch.rand(n, kdim) for _ in range(count)]
    seconds += med(lambda: [torch.nn.functional.linear(a, w) for w in ws])
    flops += 2 * m * kdim * n * count
out["torch_matmul_flops_per_s"] = flops / seconds
out["torch"] = torch.__version__
print(json.dumps(out))
'''


def run_hf(python: str, worker: str, extra: list, what: str):
    """Run an HF worker (HF_ROWS + its part) in `python` with the bench's config and `extra` arguments;
    its JSON output, or None (with a line saying why) where that interpreter lacks torch/transformers."""
    if not python or not os.path.exists(python):
        print("HF skipped: no interpreter with torch/transformers (--hf-python)")
        return None
    check = subprocess.run([python, "-c", "import torch, transformers"], capture_output=True)
    if check.returncode != 0:
        print(f"HF skipped: {python} cannot import torch and transformers")
        return None
    args = json.dumps([CONFIG, SEQ, BATCH, DECODE_STEPS, PROMPT, THREADS] + extra)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    proc = subprocess.run([python, "-c", worker, args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"HF {what} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_hf(python: str, repeats: int) -> dict | None:
    return run_hf(python, HF_WORKER, [repeats, matmul_shapes(CONFIG, BATCH * SEQ)], "benchmark")


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ["train_tokens_per_s", "prefill_tokens_per_s", "decode_b1_tokens_per_s", "decode_b8_tokens_per_s"]
    labels = ["train", "prefill", "decode b1", "decode b8"]
    ours = [results["mixtral_ms"][k] for k in keys]
    hf = [results["hf"][k] if results.get("hf") else 0 for k in keys]
    xs = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(xs - 0.2, ours, 0.4, label="mixtral-ms (MindSpore, graph mode)")
    ax.bar(xs + 0.2, hf, 0.4, label="HF transformers (PyTorch)")
    ax.set_xticks(xs, labels)
    ax.set_ylabel("tokens/s (2 CPU threads)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Mixtral, hidden 512, 4 layers, 8 experts top-2, seq 256, batch 4")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)


def limits(results: dict, side: str) -> dict:
    """Each row's fraction of this machine's limit (see the module docstring)."""
    row, fpt = results[side], flops_per_token(CONFIG, SEQ)
    out = {"train": 3 * fpt * row["train_tokens_per_s"] / results["matmul_flops_per_s"],
           "prefill": fpt * row["prefill_tokens_per_s"] / results["matmul_flops_per_s"]}
    for b in (1, 8):
        out[f"decode_b{b}"] = row[f"decode_b{b}_tokens_per_s"] * decode_bytes_per_token(CONFIG, b) / \
            results["read_bytes_per_s"]
    if "trainer_tokens_per_s" in row:
        out["trainer"] = 3 * fpt * row["trainer_tokens_per_s"] / results["matmul_flops_per_s"]
    return out


def markdown(results: dict) -> str:
    """The results table of docs/performance.md, from this run's results."""
    ours, hf = results["mixtral_ms"], results.get("hf") or {}
    frac = results["fraction_of_limit"]
    m = results["machine"]
    lines = [f"{m['cpu']}, {m['logical_cpus']} logical CPUs, {m['threads']} threads; MindSpore {m['mindspore']}"
             + (f", torch {hf['torch']}" if hf.get("torch") else "") + f"; MatMul limit (MindSpore's) "
             f"{results['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s"
             + (f" (torch's on the same shapes {hf['torch_matmul_flops_per_s'] / 1e9:.0f})"
                if hf.get("torch_matmul_flops_per_s") else "")
             + f", read bandwidth {results['read_bytes_per_s'] / 1e9:.1f} GB/s",
             "", "| row | HF | mixtral-ms | mixtral-ms / HF | HF, fraction of limit | mixtral-ms, fraction of limit |",
             "|---|---|---|---|---|---|"]
    for key, name, limit in (("train_tokens_per_s", "training step, tokens/s", "train"),
                             ("trainer_tokens_per_s", "MindFormers Trainer, tokens/s", "trainer"),
                             ("prefill_tokens_per_s", "prefill, tokens/s", "prefill"),
                             ("decode_b1_tokens_per_s", "decode batch 1, tokens/s", "decode_b1"),
                             ("decode_b8_tokens_per_s", "decode batch 8, tokens/s", "decode_b8")):
        if key not in ours:
            continue
        theirs = hf.get(key)
        cells = [f"{theirs:.0f}" if theirs else "", f"{ours[key]:.1f}", f"{ours[key] / theirs:.2f}x" if theirs else "",
                 f"{frac['hf'][limit]:.0%}" if theirs and "hf" in frac else "", f"{frac['mixtral_ms'][limit]:.0%}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Trainer overhead over the bare step: {ours['trainer_overhead']:+.1%} (bare step "
              f"{ours['train_tokens_per_s']:.0f} tokens/s before the Trainer row, "
              f"{ours['train_tokens_per_s_after_trainer']:.0f} right after it)" if "trainer_overhead" in ours
              else "", f"MoE layer (train, cf 1.1) {ours['moe_layer_ms']:.0f} ms"
              + (f" (HF's layer {hf['moe_layer_ms']:.0f} ms)" if hf.get("moe_layer_ms") else "")
              + f"; dense SwiGLU FFN with the same active parameters {ours['dense_ffn_ms']:.0f} ms; "
              f"MoE / dense {ours['moe_over_dense']:.2f}x; eval (dropless) MoE / dense {ours['moe_eval_over_dense']:.2f}x"]
    return "\n".join(line for line in lines if line is not None) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-python", default=os.path.expanduser("~/.cache/mixtral-ms/devref/bin/python"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-trainer", action="store_true", help="skip the MindFormers Trainer row")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    results = {"machine": machine(),
               "config": {**CONFIG, "seq": SEQ, "batch": BATCH, "prompt": PROMPT, "decode_steps": DECODE_STEPS,
                          "threads": THREADS, "capacity_factor": 1.1},
               "matmul_flops_per_s": matmul_limit(args.repeats), "read_bytes_per_s": read_bandwidth(args.repeats)}
    results["hf"] = bench_hf(args.hf_python, args.repeats)
    rows = OurRows()
    results["mixtral_ms"] = ours = bench_ours(args.repeats, rows)
    if not args.no_trainer:
        ours.update(bench_trainer(args.repeats + 3))
        # the bare step again right after the Trainer row: its overhead is over the mean of the two
        ours["train_tokens_per_s_after_trainer"] = BATCH * SEQ / median_time(rows.train, args.repeats)
        bare = (ours["train_tokens_per_s"] + ours["train_tokens_per_s_after_trainer"]) / 2
        ours["trainer_overhead"] = bare / ours["trainer_tokens_per_s"] - 1
    fpt = flops_per_token(CONFIG, SEQ)
    ours["train_flops_per_s"] = 3 * fpt * ours["train_tokens_per_s"]
    ours["prefill_flops_per_s"] = fpt * ours["prefill_tokens_per_s"]
    results["decode_bytes_per_token"] = {f"b{b}": decode_bytes_per_token(CONFIG, b) for b in (1, 8)}
    results["fraction_of_limit"] = {"mixtral_ms": limits(results, "mixtral_ms")}
    if results["hf"]:
        results["fraction_of_limit"]["hf"] = limits(results, "hf")
        results["ratios_ours_over_hf"] = {k: ours[k] / results["hf"][k] for k in
                                          ("train_tokens_per_s", "prefill_tokens_per_s", "decode_b1_tokens_per_s",
                                           "decode_b8_tokens_per_s")}
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    path = os.path.join(ROOT, "bench", "results", "vs_hf.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    table = os.path.join(ROOT, "bench", "results", "vs_hf.md")
    with open(table + ".tmp", "w") as f:
        f.write(markdown(results))
    os.replace(table + ".tmp", table)
    plot(results, os.path.join(ROOT, "docs", "performance.png"))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
