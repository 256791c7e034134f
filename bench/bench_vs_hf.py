#!/usr/bin/env python
"""mixtral-ms against Hugging Face `MixtralForCausalLM` (PyTorch, CPU) on one config, seed and thread count.

    source scripts/env.sh
    python bench/bench_vs_hf.py [--hf-python ~/.cache/mixtral-ms/devref/bin/python] [--repeats 5]

Measures training steps (forward with the load-balancing loss, backward, clipping to global norm 1,
AdamW: what MixtralTrainOneStepCell does, asked of HF too), prefill, decode at batch 1 and 8 with a KV cache,
and the MoE layer alone (training mode at capacity 1.1, and the dropless eval path) against a dense
SwiGLU FFN with the same active parameters (intermediate k*F).
HF runs in a separate interpreter that has torch and transformers (`--hf-python`); without one, HF is
skipped. Medians of `--repeats` runs; writes bench/results/vs_hf.json and docs/performance.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIG = dict(vocab_size=8000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
              rope_theta=1e6, rms_norm_eps=1e-5)
SEQ, BATCH, DECODE_STEPS = 256, 4, 16


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


def peak_flops(repeats: int) -> float:
    """The machine's float32 matmul peak as numpy's BLAS reaches it (n = 2048)."""
    a = np.random.rand(2048, 2048).astype(np.float32)
    t = median_time(lambda: a @ a, repeats)
    return 2 * 2048 ** 3 / t


def bench_ours(repeats: int) -> dict:
    import mindspore as ms
    from mindspore import Tensor, nn, ops
    from mixtral_ms import MixtralConfig, MixtralForCausalLM
    from mixtral_ms.optim import FusedAdamW
    from mixtral_ms.training import MixtralTrainOneStepCell
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.set_seed(0)
    cfg = MixtralConfig(**CONFIG, capacity_factor=1.1)
    model = MixtralForCausalLM(cfg)
    rng = np.random.default_rng(0)
    ids = Tensor(rng.integers(0, CONFIG["vocab_size"], (BATCH, SEQ)).astype(np.int32))
    out = {}

    step = MixtralTrainOneStepCell(model, FusedAdamW(model.trainable_params(), learning_rate=1e-4))
    step.set_train(True)
    out["train_tokens_per_s"] = BATCH * SEQ / median_time(lambda: step(ids)[0].asnumpy(), repeats)

    model.set_train(False)
    out["prefill_tokens_per_s"] = BATCH * SEQ / median_time(lambda: model(ids)[0].asnumpy(), repeats)
    for b in (1, 8):
        prompt = rng.integers(0, CONFIG["vocab_size"], (b, 32)).astype(np.int32)
        model.generate(prompt, max_new_tokens=2, eos_token_id=-1)  # compile prefill and decode graphs
        t_prefill = median_time(lambda: model.generate(prompt, max_new_tokens=1, eos_token_id=-1), repeats)
        t_all = median_time(lambda: model.generate(prompt, max_new_tokens=DECODE_STEPS + 1, eos_token_id=-1), repeats)
        out[f"decode_b{b}_tokens_per_s"] = b * DECODE_STEPS / max(t_all - t_prefill, 1e-9)

    block = model.model.layers[0].block_sparse_moe
    block.set_train(True)  # capacity 1.1
    x = Tensor(rng.normal(size=(BATCH, SEQ, CONFIG["hidden_size"])).astype(np.float32))
    mask = Tensor(np.ones((BATCH, SEQ), np.float32))

    class Dense(nn.Cell):
        """SwiGLU with intermediate k*F: the active parameters of the MoE layer."""
        def __init__(self):
            super().__init__()
            f = CONFIG["num_experts_per_tok"] * CONFIG["intermediate_size"]
            h = CONFIG["hidden_size"]
            self.w1 = ms.Parameter(Tensor(rng.normal(size=(f, h)).astype(np.float32) * 0.02))
            self.w3 = ms.Parameter(Tensor(rng.normal(size=(f, h)).astype(np.float32) * 0.02))
            self.w2 = ms.Parameter(Tensor(rng.normal(size=(h, f)).astype(np.float32) * 0.02))
            self.mm = ops.MatMul(transpose_b=True)

        def construct(self, x):
            flat = x.reshape(-1, x.shape[-1])
            return self.mm(ops.silu(self.mm(flat, self.w1)) * self.mm(flat, self.w3), self.w2)

    dense = Dense()
    out["moe_layer_ms"] = 1e3 * median_time(lambda: block(x, mask)[0].asnumpy(), repeats)
    out["dense_ffn_ms"] = 1e3 * median_time(lambda: dense(x).asnumpy(), repeats)
    block.set_train(False)  # the inference path: dropless, per-expert segments
    out["moe_layer_eval_ms"] = 1e3 * median_time(lambda: block(x, mask)[0].asnumpy(), repeats)
    return out


HF_WORKER = r'''
import json, statistics, sys, time
import numpy as np, torch
from transformers import MixtralConfig, MixtralForCausalLM
cfg, seq, batch, steps, repeats = json.loads(sys.argv[1])
torch.set_num_threads(2); torch.manual_seed(0)
model = MixtralForCausalLM(MixtralConfig(**cfg, attn_implementation="sdpa", output_router_logits=True))
rng = np.random.default_rng(0)
ids = torch.tensor(rng.integers(0, cfg["vocab_size"], (batch, seq)))
def med(fn):
    fn(); ts = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
def train():  # the work of MixtralTrainOneStepCell: loss, backward, clip to global norm 1, AdamW
    opt.zero_grad(); model(input_ids=ids, labels=ids).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
model.train(); out = {"train_tokens_per_s": batch * seq / med(train)}
model.eval()
with torch.no_grad():
    out["prefill_tokens_per_s"] = batch * seq / med(lambda: model(input_ids=ids))
    for b in (1, 8):
        prompt = torch.tensor(rng.integers(0, cfg["vocab_size"], (b, 32)))
        gen = lambda n: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        t1 = med(lambda: gen(1)); tn = med(lambda: gen(steps + 1))
        out[f"decode_b{b}_tokens_per_s"] = b * steps / max(tn - t1, 1e-9)
    x = torch.randn(batch, seq, cfg["hidden_size"])
    moe = model.model.layers[0].mlp if hasattr(model.model.layers[0], "mlp") else model.model.layers[0].block_sparse_moe
    out["moe_layer_ms"] = 1e3 * med(lambda: moe(x))
print(json.dumps(out))
'''


def bench_hf(python: str, repeats: int) -> dict | None:
    if not python or not os.path.exists(python):
        print("HF skipped: no interpreter with torch/transformers (--hf-python)")
        return None
    check = subprocess.run([python, "-c", "import torch, transformers"], capture_output=True)
    if check.returncode != 0:
        print(f"HF skipped: {python} cannot import torch and transformers")
        return None
    args = json.dumps([CONFIG, SEQ, BATCH, DECODE_STEPS, repeats])
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([python, "-c", HF_WORKER, args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"HF benchmark failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-python", default=os.path.expanduser("~/.cache/mixtral-ms/devref/bin/python"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    results = {"config": {**CONFIG, "seq": SEQ, "batch": BATCH, "threads": 2, "capacity_factor": 1.1},
               "peak_flops": peak_flops(args.repeats)}
    results["hf"] = bench_hf(args.hf_python, args.repeats)
    results["mixtral_ms"] = bench_ours(args.repeats)
    fpt = flops_per_token(CONFIG, SEQ)
    ours = results["mixtral_ms"]
    ours["train_flops_per_s"] = 3 * fpt * ours["train_tokens_per_s"]
    ours["prefill_flops_per_s"] = fpt * ours["prefill_tokens_per_s"]
    ours["moe_over_dense"] = ours["moe_layer_ms"] / ours["dense_ffn_ms"]
    ours["moe_eval_over_dense"] = ours["moe_layer_eval_ms"] / ours["dense_ffn_ms"]
    if results["hf"]:
        results["ratios_ours_over_hf"] = {k: ours[k] / results["hf"][k] for k in
                                          ("train_tokens_per_s", "prefill_tokens_per_s", "decode_b1_tokens_per_s",
                                           "decode_b8_tokens_per_s")}
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    path = os.path.join(ROOT, "bench", "results", "vs_hf.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    plot(results, os.path.join(ROOT, "docs", "performance.png"))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
