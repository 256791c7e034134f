"""Train, fine-tune or generate with Mixtral from a MindFormers YAML: the project's run_mindformer.py.

  python scripts/run_mixtral.py --config configs/mixtral_tiny_cpu.yaml --run_mode train
  python scripts/run_mixtral.py --config configs/mixtral_tiny_cpu.yaml --run_mode train \\
      --load_checkpoint runs/tiny/checkpoint/rank_0/mixtral_tiny_rank_0-1_200.ckpt --resume_training
  python scripts/run_mixtral.py --config configs/mixtral_tiny_finetune_cpu.yaml --run_mode finetune
  python scripts/run_mixtral.py --config configs/mixtral_tiny_finetune_cpu.yaml --run_mode predict \
      --load_checkpoint runs/tiny_sft/checkpoint --instruct --predict_data "Continue the passage ..."
  python scripts/run_mixtral.py --config configs/mixtral_tiny_cpu.yaml --run_mode predict \\
      --load_checkpoint runs/tiny/checkpoint --predict_data "In the beginning" --max_new_tokens 40
  python scripts/run_mixtral.py --config configs/mixtral_tiny_cpu.yaml --run_mode eval \\
      --load_checkpoint runs/tiny/checkpoint --eval_dataset runs/data/a_heldout.mindrecord

Training runs through `mindformers.Trainer` (train / finetune) with the YAML's wrapper, optimizer,
schedule and callbacks. `load_checkpoint` (YAML or flag) may be a MindSpore .ckpt or .safetensors file,
a folder of them (the newest file is taken), a mixtral-ms folder written by `convert_weight.py hf2ms`,
or a Hugging Face folder; every parameter must be present with the config's shape. With
`resume_training` the optimizer state, step, loss scale and data position come back too, and the run
continues exactly where the checkpoint left off. Predict tokenizes with the SentencePiece model (the
YAML's `tokenizer`), left-pads the prompts and calls `model.generate` (KV cache). Eval prints and writes
(JSON) the per-token cross-entropy and perplexity on a MindRecord, forward passes only (evaluate.py).

Bad input (YAML values, flags, dataset, checkpoint, token ids) prints one line `error: ...` and exits
with status 2, as does a run that diverges (too many skipped steps, exploded weights at a save); SIGTERM
and Ctrl-C stop with status 143 / 130 and leave no partial checkpoint. What is refused and what survives
which fault: docs/reliability.md. The logic lives in mixtral_ms/run/runner.py.
"""
from typing import Optional, Sequence

from mixtral_ms.run.runner import main as _main


def main(argv: Optional[Sequence[str]] = None) -> int:
    return _main(argv, description=__doc__)
