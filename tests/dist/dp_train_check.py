"""Worker of the one 2-process msrun launch in tests/test_parallel.py (every multi-process check in it).

    msrun --worker_num=2 --local_worker_num=2 --master_addr=127.0.0.1 --master_port=P --join=True \
        --log_dir=D tests/dist/dp_train_check.py --workdir W

Graph mode, DATA_PARALLEL with gradient mean; each rank takes its half of every global batch (rank r
takes rows r*B/2 .. (r+1)*B/2-1). In order:

1. `wrapper_accum`: MixtralTrainOneStepCell on `wrapper_setup(2)` (MindFormers' AdamW, clipping active,
   capacity 1.0 with one MoE token group per rank, global-batch aux loss, router bias) with
   gradient_accumulation_steps 2: `wrapper_accum_rank<r>.npz` and `wrapper_accum_rank<r>.json` (local losses,
   global norms, overflow flags, the side channel the wrapper all-reduced: tokens per expert, dropped
   assignments, CE and aux; the routers' biases).
2. `run_mixtral`: scripts/run_mixtral.py's main on W/run.yaml (a shipped parallel YAML scaled to 2
   devices), in this process: `run_mixtral_rank<r>.json` holds its exit status or the exception it
   raised (MindSpore's CPU backend refuses the semi-auto-parallel compile at the end).
"""
from __future__ import annotations

import argparse
import json
import os
import traceback

import numpy as np

import mindspore as ms
from mindspore import Tensor

WRAPPER_STEPS, WRAPPER_BATCH, WRAPPER_TOKENS = 3, 4, 9


def wrapper_setup(accumulation: int = 1, groups: int = 1):
    """(model, train-one-step cell, global batches [steps, B, S+1]) for the current context. Capacity factor
    1.0 (some expert overflows) over `groups` MoE token groups per pass, z loss off; the aux loss over the
    global batch and the router bias on: both read every rank's tokens per expert, so ranks and one process
    on the same passes (one token group per rank) agree exactly."""
    from mindformers.core.optim import AdamW
    from mixtral_ms import MixtralConfig, MixtralForCausalLM
    from mixtral_ms.run.wrapper import MixtralTrainOneStepCell
    ms.set_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           max_position_embeddings=64, capacity_factor=1.0, moe_token_groups=groups,
                           router_aux_loss_coef=0.1, router_z_loss_coef=0.0, router_aux_loss_scope="global_batch",
                           router_bias_update_rate=0.05)
    model = MixtralForCausalLM(config)
    model.set_train(True)
    optimizer = AdamW(model.trainable_params(), learning_rate=1e-2)
    step = MixtralTrainOneStepCell(model, optimizer, max_grad_norm=0.5, gradient_accumulation_steps=accumulation)
    batches = np.random.default_rng(0).integers(0, 64, (WRAPPER_STEPS, WRAPPER_BATCH, WRAPPER_TOKENS)).astype(np.int32)
    return model, step, batches


def train_wrapper(step, model, batches, rows, rank):
    """Run `step` on this rank's rows of each batch: losses, norms, overflow flags, tokens per expert, dropped
    assignments, CE and aux terms, routers' biases."""
    record = {"losses": [], "norms": [], "overflow": [], "load": [], "dropped": [], "ce": [], "aux": [],
              "passes": [], "bias": []}
    for batch in batches:
        loss, overflow, _, _, norm = step(Tensor(batch[rank * rows:(rank + 1) * rows]))
        stats = model.training_stats.read_and_reset()
        record["losses"].append(float(loss))
        record["norms"].append(float(norm))
        record["overflow"].append(bool(overflow))
        record["load"].append(stats["expert_load"].tolist())
        record["dropped"].append(stats["dropped"].tolist())
        record["passes"].append(stats["passes"])
        record["ce"].append(stats["terms"]["ce_loss"])
        record["aux"].append(stats["terms"]["aux_loss"])
        record["bias"].append([layer.block_sparse_moe.gate.e_score_correction_bias.asnumpy().tolist()
                               for layer in model.model.layers])
    return record


def save(workdir, name, rank, world, model, record):
    np.savez(os.path.join(workdir, f"{name}rank{rank}.npz"), **{p.name: p.asnumpy() for p in model.trainable_params()})
    with open(os.path.join(workdir, f"{name}rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "world": world, **record}, f)


def main() -> None:
    from mindspore.communication import get_group_size, get_rank, init
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    init()
    rank, world = get_rank(), get_group_size()
    ms.set_auto_parallel_context(parallel_mode="data_parallel", gradients_mean=True, device_num=world)

    # 1. the wrapper with gradient accumulation
    model, step, batches = wrapper_setup(2)
    assert step.reducer_flag
    record = train_wrapper(step, model, batches, WRAPPER_BATCH // world, rank)
    save(args.workdir, "wrapper_accum_", rank, world, model, record)
    print(f"rank {rank}/{world}: data-parallel checks done", flush=True)

    # 2. run_mixtral.py on a shipped parallel YAML, up to MindSpore's semi-auto compile
    from mixtral_ms.run.runner import main as run_mixtral
    ms.reset_auto_parallel_context()
    os.environ["DEVICE_TARGET"] = "CPU"  # what scripts/msrun_launcher.sh --device cpu exports
    result = {}
    try:
        result["status"] = run_mixtral(["--config", os.path.join(args.workdir, "run.yaml"), "--run_mode", "train"])
    except Exception as err:  # noqa: BLE001  (the test reads which error it was)
        result["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
        result["traceback"] = traceback.format_exc()[-6000:]
    with open(os.path.join(args.workdir, f"run_mixtral_rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    print(f"rank {rank}/{world} done", flush=True)


if __name__ == "__main__":
    main()
