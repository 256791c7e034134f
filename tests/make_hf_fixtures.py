"""Build tiny random Hugging Face Mixtrals and record their outputs as golden references.

Run by hand in a dev venv with torch and transformers (CI never needs them):
    python -m venv ~/.cache/mixtral-ms/devref
    ~/.cache/mixtral-ms/devref/bin/pip install torch==2.13.0 transformers safetensors "numpy<2"
    ~/.cache/mixtral-ms/devref/bin/python tests/make_hf_fixtures.py

Each fixture folder holds config.json, sharded safetensors in the released checkpoint layout
(per-expert w1/w2/w3) with model.safetensors.index.json, golden.npz and meta.json. Seeds are
retried until routing and greedy decoding are decisive (notes/moe-anchors.md): every top-k boundary
has a router-logit gap >= 1e-3 and every greedy step a top-1/top-2 margin >= 1e-2, so a 1e-7
difference between frameworks cannot flip a choice and fake a mismatch.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
import transformers
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures")
ROUTER_GAP = 1e-3
GREEDY_MARGIN = 1e-2

FIXTURES = {
    # 8 experts top-2, GQA 8:2, rope_theta at top level (as the released config.json)
    "tiny8": dict(config=dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                              num_experts_per_tok=2, max_position_embeddings=128, rope_theta=1e6,
                              sliding_window=None, rms_norm_eps=1e-5),
                  rope_layout="top_level", batch=2, seq=12, prompt=5, new=8),
    # 4 experts, sliding window shorter than the sequence, heads 6:3, transformers-5 rope_parameters
    "tiny4sw": dict(config=dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=6, num_key_value_heads=3, num_local_experts=4,
                                num_experts_per_tok=2, max_position_embeddings=64, rope_theta=1e4,
                                sliding_window=5, rms_norm_eps=1e-6),
                    rope_layout="rope_parameters", batch=2, seq=12, prompt=6, new=8),
}


def router_gap(router_logits: tuple, k: int, token_mask: np.ndarray | None = None) -> float:
    """Smallest gap between the k-th and (k+1)-th router logit over layers and (unmasked) tokens."""
    gaps = []
    for logits in router_logits:
        top = torch.topk(logits.float(), k + 1, dim=-1).values
        gap = (top[:, k - 1] - top[:, k]).numpy()
        if token_mask is not None:
            gap = gap[token_mask.reshape(-1) > 0]
        gaps.append(gap.min())
    return float(min(gaps))


def greedy_with_margins(model, ids, mask, new_tokens, k):
    """HF greedy generate, plus the decisiveness of each step (logit margin, router gap)."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    margins = []
    for score in out.scores:
        top = torch.topk(score.float(), 2, dim=-1).values
        margins.append(float((top[:, 0] - top[:, 1]).min()))
    return out.sequences[:, ids.shape[1]:].numpy(), min(margins)


def generate_checked(model, ids, mask, new_tokens, k):
    """greedy_with_margins, plus the smallest router gap seen by the gates during that very (KV-cached)
    generate: the prefill (padding rows excluded) and every decode step."""
    seen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, args, out: seen.append(out[0].detach()))
             for layer in model.model.layers]
    try:
        tokens, margin = greedy_with_margins(model, ids, mask, new_tokens, k)
    finally:
        for hook in hooks:
            hook.remove()
    prefill_rows = mask.numpy().reshape(-1)
    gaps = [router_gap((r,), k, prefill_rows if r.shape[0] == prefill_rows.size else None) for r in seen]
    return tokens, margin, min(gaps)


def observed_sliding_window_rule(model, window: int | None) -> str:
    """Read the rule off the eager attention probabilities (which keys get non-zero weight)."""
    s = 12
    with torch.no_grad():
        probs = model(input_ids=torch.arange(3, 3 + s)[None], output_attentions=True).attentions[0][0, 0]
    seen = (probs > 0).numpy()
    i, j = np.indices((s, s))
    if window is None:
        assert (seen == (j <= i)).all(), "expected a plain causal mask"
        return "no sliding window: key j visible to query i iff j <= i"
    assert (seen == ((j <= i) & (i - j < window))).all(), "sliding-window rule changed"
    return f"key j visible to query i iff j <= i and i - j < sliding_window ({window} keys incl. itself)"


def build(name: str, spec: dict, seed: int):
    cfg = MixtralConfig(**spec["config"], router_aux_loss_coef=0.02, router_jitter_noise=0.0,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # decisive routing: large gate weights
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 1.0)
    rng = np.random.default_rng(seed)
    b, s, v = spec["batch"], spec["seq"], spec["config"]["vocab_size"]
    ids = torch.tensor(rng.integers(3, v, (b, s)), dtype=torch.long)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, :3] = 0
    ids[1, :3] = 0
    k = cfg.num_experts_per_tok
    with torch.no_grad():
        plain = model(input_ids=ids, labels=ids, output_router_logits=True)
        masked = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        ce = model(input_ids=ids, labels=ids).loss  # without router logits: CE only
    gap = min(router_gap(plain.router_logits, k), router_gap(masked.router_logits, k, mask.numpy()))
    aux_masked = load_balancing_loss_func(masked.router_logits, cfg.num_local_experts, k, mask)
    assert torch.equal(aux_masked, masked.aux_loss)  # HF masks the aux loss itself when given a mask

    p, new = spec["prompt"], spec["new"]
    gen_ids = torch.tensor(rng.integers(3, v, (2, p)), dtype=torch.long)
    gen_mask = torch.ones(2, p, dtype=torch.long)
    gen_mask[1, :2] = 0
    gen_ids[1, :2] = 0
    gen_tokens, margin_a, gap_a = generate_checked(model, gen_ids, gen_mask, new, k)
    gen1_ids = torch.tensor(rng.integers(3, v, (1, p + 1)), dtype=torch.long)
    gen1_tokens, margin_b, gap_b = generate_checked(model, gen1_ids, torch.ones_like(gen1_ids), new, k)
    golden = {
        "input_ids": ids.numpy(), "attention_mask": mask.numpy(),
        "logits": plain.logits.numpy(), "logits_masked": masked.logits.numpy(),
        "loss": np.float32(plain.loss), "ce_loss": np.float32(ce), "aux_loss": np.float32(plain.aux_loss),
        "aux_loss_masked": np.float32(aux_masked),
        "router_logits": np.stack([r.numpy() for r in plain.router_logits]),
        "router_logits_masked": np.stack([r.numpy() for r in masked.router_logits]),
        "gen_prompt_ids": gen_ids.numpy(), "gen_prompt_mask": gen_mask.numpy(), "gen_tokens": gen_tokens,
        "gen1_prompt_ids": gen1_ids.numpy(), "gen1_tokens": gen1_tokens,
    }
    margins = {"router_gap": min(gap, gap_a, gap_b), "greedy_margin": min(margin_a, margin_b)}
    tokens = np.concatenate([gen_tokens.reshape(-1), gen1_tokens.reshape(-1)])
    if len(set(tokens.tolist())) < 3:  # a degenerate model repeating one token tests nothing
        margins["greedy_margin"] = 0.0
    return model, golden, margins


def save(name: str, spec: dict, model, golden: dict, margins: dict, seed: int) -> None:
    folder = os.path.join(OUT, name)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, max_shard_size="60KB" if name == "tiny4sw" else "120KB")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert len(files) >= 2 and os.path.exists(os.path.join(folder, "model.safetensors.index.json")), files
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    rope = config.pop("rope_parameters", None) or {"rope_theta": spec["config"]["rope_theta"], "rope_type": "default"}
    config.pop("rope_theta", None)
    if spec["rope_layout"] == "top_level":  # as the released config.json: rope_theta, torch_dtype
        config["rope_theta"] = rope["rope_theta"]
        config["torch_dtype"] = config.pop("dtype", "float32")
    else:  # as transformers 5 writes it: rope_parameters, dtype
        config["rope_parameters"] = rope
    config.pop("_attn_implementation", None)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    np.savez_compressed(os.path.join(folder, "golden.npz"), **golden)
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "seed": seed,
            "attn_implementation": "eager", "shards": files, **margins,
            "sliding_window_rule": observed_sliding_window_rule(model, spec["config"]["sliding_window"]),
            "generate_position_ids": "prefill cumsum(attention_mask) - 1 with padding positions set to 0, "
                                     "then last position + 1 per step",
            "forward_position_ids": "arange(S) even with an attention_mask (logits_masked)",
            "aux_loss_masked": "load_balancing_loss_func(router logits of the masked run, mask) == HF's aux_loss "
                               "for model(ids, attention_mask=mask, output_router_logits=True)",
            "router_gap_scope": "k-th minus (k+1)-th router logit, every layer, every non-padding token of the "
                                "unmasked and masked runs and of both generate calls (prefill and each step)"}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(f"{name}: seed {seed}, {margins}, shards {files}")


def main() -> None:
    torch.set_num_threads(2)
    for name, spec in FIXTURES.items():
        for seed in range(200):
            model, golden, margins = build(name, spec, seed)
            if margins["router_gap"] >= ROUTER_GAP and margins["greedy_margin"] >= GREEDY_MARGIN:
                break
        else:
            raise SystemExit(f"{name}: no decisive seed found")
        save(name, spec, model, golden, margins, seed)
        # The folder must reload to the same logits (the checkpoint layout round-trips through HF).
        again = MixtralForCausalLM.from_pretrained(os.path.join(OUT, name), attn_implementation="eager").eval()
        with torch.no_grad():
            logits = again(input_ids=torch.tensor(golden["input_ids"])).logits.numpy()
        assert np.array_equal(logits, golden["logits"]), name


if __name__ == "__main__":
    main()
