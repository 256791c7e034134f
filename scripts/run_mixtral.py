#!/usr/bin/env python
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
      --load_checkpoint runs/tiny/checkpoint --eval_dataset runs/data/train_heldout.mindrecord

Training runs through `mindformers.Trainer` (train / finetune) with the YAML's wrapper, optimizer,
schedule and callbacks. `load_checkpoint` (YAML or flag) may be a MindSpore .ckpt or .safetensors file,
a folder of them (the newest file is taken), a mixtral-ms folder written by `convert_weight.py hf2ms`,
or a Hugging Face folder; every parameter must be present with the config's shape. With
`resume_training` the optimizer state, step, loss scale and data position come back too, and the run
continues exactly where the checkpoint left off. Predict tokenizes with the SentencePiece model (the
YAML's `tokenizer`), left-pads the prompts and calls `model.generate` (KV cache). Eval prints and writes
(JSON) the per-token cross-entropy and perplexity on a MindRecord (mixtral_ms/evaluate.py).

Bad input (YAML, dataset, checkpoint) prints one line `error: ...` and exits with status 2.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GENERATION_KEYS = {"max_new_tokens": int, "do_sample": bool, "temperature": float, "top_k": int, "top_p": float}


class RunError(Exception):
    """A run that cannot start: bad YAML, dataset or checkpoint."""


def load_config(path: str, overrides: dict):
    """The YAML as a MindFormerConfig, checked (top-level keys, registered types, arguments, model_config)."""
    import yaml
    from mindformers import MindFormerConfig
    from mixtral_ms.training import check_config
    if not os.path.isfile(path):
        raise RunError(f"no config file {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RunError(f"{path}: malformed YAML{where}") from None
    if not isinstance(raw, dict):
        raise RunError(f"{path}: the YAML must be a mapping of sections")
    check_config(raw)
    config = MindFormerConfig(path)
    for key, value in overrides.items():
        if value is not None:
            config[key] = value
    return config


def model_config(config):
    """The MixtralConfig the YAML describes (unknown keys and bad values raise ConfigError)."""
    from mixtral_ms.configuration import MixtralConfig
    return MixtralConfig(**{k: v for k, v in config.model.model_config.items() if k != "type"})


def resolve_checkpoint(path: str) -> str:
    """A file or folder users name; for a folder of training checkpoints, the newest file."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise RunError(f"no checkpoint at {path}")
    if os.path.isfile(os.path.join(path, "config.json")) or glob.glob(os.path.join(path, "*.safetensors.index.json")):
        return path
    files = glob.glob(os.path.join(path, "**", "*.ckpt"), recursive=True) + \
        glob.glob(os.path.join(path, "**", "*.safetensors"), recursive=True)
    if not files:
        raise RunError(f"no .ckpt or .safetensors checkpoint under {path}")
    return max(files, key=lambda f: (os.path.getmtime(f), f))


def build_model(config, checkpoint: str | None, layout=None):
    """The model of the YAML, filled from `checkpoint` with a strict name and shape check; with
    `use_parallel`, sharded by the plan for the layout prepare_parallel() validated (mixtral_ms/parallel)."""
    from mixtral_ms import MixtralForCausalLM
    from mixtral_ms.checkpoint import load_weights
    model = MixtralForCausalLM(model_config(config))
    if checkpoint:
        load_weights(model, resolve_checkpoint(checkpoint))
    if layout is not None:
        from mixtral_ms.parallel.plan import apply_plan
        apply_plan(model, layout, config.run_mode)
    return model


def prepare_resume(config, model) -> int:
    """Point MindFormers' resume at exactly one checkpoint file and return its step.

    MindFormers resumes from a folder of `rank_<i>/` checkpoints and picks the newest; the file the user
    names (or the newest under the folder) is linked alone into `<output_dir>/resume_from/rank_0/` so the
    step resumed is the one asked for. The weights are first loaded with our strict check, so a
    checkpoint from another config fails with a clear message before MindFormers tries."""
    import mindspore as ms
    from mixtral_ms.checkpoint import load_weights
    if not config.load_checkpoint:
        raise RunError("resume_training needs load_checkpoint (a training checkpoint file or folder)")
    path = resolve_checkpoint(config.load_checkpoint)
    if not path.endswith(".ckpt"):
        raise RunError(f"resume_training needs a MindSpore training checkpoint (.ckpt with optimizer state), "
                       f"got {path}")
    load_weights(model, path)
    state = ms.load_checkpoint(path, choice_func=lambda name: name in ("step_num", "epoch_num"))
    if "step_num" not in state:
        raise RunError(f"{path} holds no training state (step_num); it cannot be resumed, only fine-tuned from")
    folder = os.path.join(config.output_dir, "resume_from", "rank_0")
    os.makedirs(folder, exist_ok=True)
    for old in os.listdir(folder):
        os.remove(os.path.join(folder, old))
    os.symlink(os.path.abspath(path), os.path.join(folder, os.path.basename(path)))
    config.load_checkpoint = os.path.dirname(folder)
    config.resume_training = True
    return int(state["step_num"].asnumpy().reshape(-1)[0])


def run_train(config, finetune: bool, layout=None) -> None:
    from mindformers import Trainer
    from mixtral_ms.data import check_dataset
    columns = list(config.train_dataset.get("input_columns") or ["input_ids"])
    check_dataset(config.train_dataset.data_loader.dataset_dir, model_config(config).seq_length, columns)
    if config.resume_training:
        model = build_model(config, None, layout)
        step = prepare_resume(config, model)
        for callback in config.callbacks or []:
            if callback.get("type") in ("MixtralProgressMonitor", "RouterStatsMonitor"):
                callback["initial_step"] = step
        print(f"resuming from step {step}", flush=True)
        Trainer(args=config, model=model).train()  # MindFormers restores weights, optimizer, step, data position
        return
    model = build_model(config, config.load_checkpoint or None, layout)
    config.load_checkpoint = ""  # loaded above, strictly; MindFormers must not load it again
    trainer = Trainer(args=config, model=model)
    (trainer.finetune if finetune else trainer.train)()


def generation_settings(config, args) -> dict:
    settings = {"max_new_tokens": 40, "do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    section = config.get("generation") or {}
    unknown = sorted(set(section) - set(GENERATION_KEYS))
    if unknown:
        raise RunError(f"unknown key(s) {unknown} in generation (known: {sorted(GENERATION_KEYS)})")
    settings.update({k: GENERATION_KEYS[k](v) for k, v in section.items()})
    settings.update({k: getattr(args, k) for k in GENERATION_KEYS if getattr(args, k) is not None})
    return settings


def run_predict(config, prompts, settings: dict, instruct: bool = False, layout=None) -> None:
    import numpy as np
    import sentencepiece as spm
    tokenizer_path = config.get("tokenizer") or os.path.join(ROOT, "data", "tokenizer", "tokenizer.model")
    if not os.path.isabs(tokenizer_path) and not os.path.isfile(tokenizer_path):
        tokenizer_path = os.path.join(ROOT, tokenizer_path)
    if not os.path.isfile(tokenizer_path):
        raise RunError(f"no tokenizer at {tokenizer_path}")
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    if not config.load_checkpoint:
        raise RunError("predict needs --load_checkpoint (or load_checkpoint in the YAML)")
    model = build_model(config, config.load_checkpoint, layout)
    if sp.get_piece_size() > model.config.vocab_size:
        raise RunError(f"the tokenizer {tokenizer_path} has {sp.get_piece_size()} pieces but the model's "
                       f"vocab_size is {model.config.vocab_size}")
    if instruct:  # the Mixtral-Instruct template the fine-tuning data was rendered with (mixtral_ms/data.py)
        prompts = [f"[INST] {p} [/INST]" for p in prompts]
    encoded = [[sp.bos_id()] + sp.encode(p) for p in prompts]
    width = max(map(len, encoded))
    ids = np.zeros((len(encoded), width), np.int32)
    mask = np.zeros((len(encoded), width), np.float32)
    for row, tokens in enumerate(encoded):  # left padding
        ids[row, width - len(tokens):] = tokens
        mask[row, width - len(tokens):] = 1
    out = model.generate(ids, mask, eos_token_id=sp.eos_id(), pad_token_id=max(sp.pad_id(), 0),
                         seed=int(config.seed or 0), **settings)
    for tokens, row in zip(encoded, out):
        new = [int(t) for t in row[width:]]
        if sp.eos_id() in new:
            new = new[:new.index(sp.eos_id())]
        print("> " + sp.decode(tokens[1:] + new), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--run_mode", choices=["train", "finetune", "predict", "eval"])
    parser.add_argument("--load_checkpoint", help="checkpoint file or folder (overrides the YAML)")
    parser.add_argument("--resume_training", action="store_true", default=None,
                        help="also restore optimizer state, step and data position from load_checkpoint")
    parser.add_argument("--train_dataset", help="MindRecord file (overrides train_dataset.data_loader.dataset_dir)")
    parser.add_argument("--output_dir")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--predict_data", nargs="+", default=["In the beginning"])
    parser.add_argument("--instruct", action="store_true",
                        help="wrap each prompt in Mixtral-Instruct's [INST] ... [/INST] (fine-tuned models)")
    parser.add_argument("--eval_dataset", help="eval: the MindRecord to score (CE and perplexity, no gradients)")
    parser.add_argument("--eval_output", help="eval: the JSON written (default <output_dir>/eval.json)")
    parser.add_argument("--eval_samples", type=int, help="eval: only the first N samples")
    parser.add_argument("--max_new_tokens", type=int)
    parser.add_argument("--do_sample", action="store_true", default=None)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top_k", type=int)
    parser.add_argument("--top_p", type=float)
    args = parser.parse_args(argv)

    from mixtral_ms.configuration import ConfigError
    from mixtral_ms.data import DataError
    from mixtral_ms.parallel.config import ParallelConfigError
    from mixtral_ms.safetensors_io import CheckpointError
    try:
        config = load_config(args.config, {"run_mode": args.run_mode, "load_checkpoint": args.load_checkpoint,
                                           "resume_training": args.resume_training, "output_dir": args.output_dir})
        if args.train_dataset:
            config.train_dataset.data_loader.dataset_dir = args.train_dataset
        if args.epochs:
            config.runner_config.epochs = args.epochs
        for callback in config.callbacks or []:
            if callback.get("type") == "RouterStatsMonitor" and (args.output_dir or "output_dir" not in callback):
                callback["output_dir"] = config.output_dir
        settings = generation_settings(config, args)
        import mindspore as ms
        from mindformers.core.context import build_context
        build_context(config)
        if (config.get("context") or {}).get("mode") is not None:  # MindFormers' context is built once per
            ms.set_context(mode=int(config.context.mode))           # process; a later run keeps its own mode
        ms.set_seed(int(config.seed or 0))  # before the model is built: initial weights follow the YAML's seed
        layout = None
        if config.use_parallel:  # validate the layout against the world size, set the auto-parallel context
            from mixtral_ms.parallel.plan import prepare_parallel
            layout = prepare_parallel(config)
        if config.run_mode in ("train", "finetune"):
            run_train(config, config.run_mode == "finetune", layout)
        elif config.run_mode == "predict":
            run_predict(config, args.predict_data, settings, args.instruct, layout)
        elif config.run_mode == "eval":
            from mixtral_ms.evaluate import run_eval
            run_eval(config, lambda cfg, ckpt: build_model(cfg, ckpt, layout), args.eval_dataset, args.eval_output,
                     args.eval_samples)
        else:
            raise RunError(f"run_mode must be train, finetune, predict or eval, got {config.run_mode!r}")
    except (RunError, ConfigError, DataError, CheckpointError, ParallelConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
