"""Build a tiny random Hugging Face MistralForCausalLM (the dense source of `experts.py upcycle` and of
`mix` with dense branches) and record its logits as the golden reference; then check, with transformers,
that the surgery outputs load in MixtralForCausalLM and compute what they must.

Run by hand in the dev venv (CI never needs torch):
    ~/.cache/mixtral-ms/devref/bin/python tests/make_mistral_fixture.py          # writes tests/fixtures/tinymistral
    ~/.cache/mixtral-ms/devref/bin/python tests/make_mistral_fixture.py --check  # surgery outputs vs transformers

The check runs scripts/experts.py (numpy only) into a temp folder and asserts, in torch: upcycled
Mixtrals' logits == the dense Mistral's (1e-5); `extract` of all experts of tiny8 == tiny8's logits exactly;
`extract` of a subset loads and has the subset's shapes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers
from transformers import MistralConfig, MistralForCausalLM, MixtralForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "fixtures", "tinymistral")
SEED = 0
CONFIG = dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rope_theta=1e4, sliding_window=None,
              rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.1)


def build() -> None:
    torch.manual_seed(SEED)
    cfg = MistralConfig(**CONFIG)
    cfg._attn_implementation = "eager"
    model = MistralForCausalLM(cfg).eval()
    rng = np.random.default_rng(SEED)
    ids = torch.tensor(rng.integers(3, CONFIG["vocab_size"], (2, 10)), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    shutil.rmtree(OUT, ignore_errors=True)
    model.save_pretrained(OUT, max_shard_size="40KB")  # sharded + index, as released checkpoints
    with open(os.path.join(OUT, "config.json")) as f:
        config = json.load(f)
    config.pop("_attn_implementation", None)
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    np.savez_compressed(os.path.join(OUT, "golden.npz"), input_ids=ids.numpy(), logits=out.logits.numpy(),
                        ce_loss=np.float32(out.loss))
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__, "seed": SEED,
                   "attn_implementation": "eager", "made_by": "tests/make_mistral_fixture.py"}, f, indent=2)
    print(f"wrote {OUT}: {sorted(os.listdir(OUT))}")


def experts_cli(*args: str) -> None:
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "experts.py"), *args, "--quiet"], check=True)


def logits_of(folder: str, ids: torch.Tensor, cls=MixtralForCausalLM) -> np.ndarray:
    model = cls.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.numpy()


def check() -> None:
    golden = np.load(os.path.join(OUT, "golden.npz"))
    ids = torch.tensor(golden["input_ids"])
    tmp = tempfile.mkdtemp()
    try:
        for experts, top_k in ((1, 1), (4, 1), (4, 2)):
            dst = os.path.join(tmp, f"up{experts}{top_k}")
            experts_cli("upcycle", "--src", OUT, "--dst", dst, "--experts", str(experts), "--top-k", str(top_k))
            diff = np.abs(logits_of(dst, ids) - golden["logits"]).max()
            print(f"upcycle E={experts} k={top_k}: max |mixtral - mistral| = {diff:.3g}")
            assert diff < 1e-5, diff
        tiny8 = os.path.join(HERE, "fixtures", "tiny8")
        ids8 = torch.tensor(np.load(os.path.join(tiny8, "golden.npz"))["input_ids"])
        dst = os.path.join(tmp, "all")
        experts_cli("extract", "--src", tiny8, "--dst", dst, "--experts", "0,1,2,3,4,5,6,7")
        assert np.array_equal(logits_of(dst, ids8), logits_of(tiny8, ids8))
        dst = os.path.join(tmp, "sub")
        experts_cli("extract", "--src", tiny8, "--dst", dst, "--experts", "0,3,5")
        model = MixtralForCausalLM.from_pretrained(dst)
        assert model.config.num_local_experts == 3 and model.model.layers[0].mlp.gate.weight.shape[0] == 3
        print("extract: all experts bit-exact in transformers; subset 0,3,5 loads as a 3-expert Mixtral")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    torch.set_num_threads(2)
    check() if "--check" in sys.argv else build()
