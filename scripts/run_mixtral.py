#!/usr/bin/env python
"""Train, fine-tune or generate with Mixtral from a MindFormers YAML: the project's run_mindformer.py.

  python scripts/run_mixtral.py --config configs/mixtral_tiny_cpu.yaml --run_mode train
  python scripts/run_mixtral.py --config configs/mixtral_tiny_finetune_cpu.yaml --run_mode finetune \
      --load_checkpoint runs/tiny/checkpoint
  python scripts/run_mixtral.py --config configs/mixtral_tiny_cpu.yaml --run_mode predict \
      --load_checkpoint runs/tiny/checkpoint --predict_data "In the beginning" --max_new_tokens 40

`load_checkpoint` may be a MindSpore .ckpt or .safetensors file, a folder of them (the newest file is
taken), a mixtral-ms folder from `convert_weight.py hf2ms`, or a Hugging Face folder. Training state
(optimizer moments, step) is restored only with --resume_training.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Top-level YAML keys this entry point and MindFormers' trainer understand; anything else is a typo.
KNOWN_KEYS = {
    "seed", "output_dir", "run_mode", "use_parallel", "load_checkpoint", "load_ckpt_format", "auto_trans_ckpt",
    "resume_training", "src_strategy_path_or_dir", "only_save_strategy", "context", "parallel", "parallel_config",
    "trainer", "runner_config", "runner_wrapper", "optimizer", "lr_schedule", "train_dataset",
    "train_dataset_task", "model", "moe_config", "recompute_config", "callbacks", "tokenizer", "generation",
    "micro_batch_interleave_num", "monitor_config", "swap_config", "metric", "profile",
}


class RunError(Exception):
    """A run that cannot start: bad YAML, dataset or checkpoint."""


def load_config(path: str, overrides: dict):
    import yaml
    from mindformers import MindFormerConfig
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
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise RunError(f"{path}: unknown top-level key(s) {unknown}")
    config = MindFormerConfig(path)
    for key, value in overrides.items():
        if value is not None:
            config[key] = value
    return config


def model_config(config):
    """The MixtralConfig the YAML describes (unknown keys and bad values raise ConfigError)."""
    from mixtral_ms.configuration import MixtralConfig
    fields = {k: v for k, v in config.model.model_config.items() if k != "type"}
    if config.model.model_config.get("type") != "MixtralConfig" or config.model.arch.get("type") != "MixtralForCausalLM":
        raise RunError("model.model_config.type must be MixtralConfig and model.arch.type MixtralForCausalLM")
    return MixtralConfig(**fields)


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
    return max(files, key=os.path.getmtime)


def resume_folder(path: str, output_dir: str) -> str:
    """MindFormers resumes from a folder of `rank_<i>/` checkpoints (the newest one); a single file the
    user names is linked into such a folder so exactly that step is resumed."""
    if os.path.isdir(path):
        return path
    if not os.path.isfile(path):
        raise RunError(f"no checkpoint at {path}")
    folder = os.path.join(output_dir, "resume_from", "rank_0")
    os.makedirs(folder, exist_ok=True)
    link = os.path.join(folder, os.path.basename(path))
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.abspath(path), link)
    return os.path.dirname(folder)


def build_model(config, checkpoint: str | None):
    from mixtral_ms import MixtralForCausalLM
    from mixtral_ms.checkpoint import load_weights
    model = MixtralForCausalLM(model_config(config))
    if checkpoint:
        load_weights(model, resolve_checkpoint(checkpoint))
    return model


def run_train(config, finetune: bool) -> None:
    from mindformers import Trainer
    from mixtral_ms.data import check_dataset
    dataset = config.train_dataset.data_loader.dataset_dir
    check_dataset(dataset, model_config(config).seq_length)
    resume = bool(config.resume_training)
    if resume:  # MindFormers restores weights, optimizer state, step and data position from its checkpoint
        config.load_checkpoint = resume_folder(config.load_checkpoint, config.output_dir)
        Trainer(args=config).train()
        return
    model = build_model(config, config.load_checkpoint or None)
    config.load_checkpoint = ""
    trainer = Trainer(args=config, model=model)
    (trainer.finetune if finetune else trainer.train)()


def run_predict(config, prompts, max_new_tokens: int, do_sample: bool, temperature: float, top_k: int,
                top_p: float) -> None:
    import numpy as np
    import sentencepiece as spm
    tokenizer_path = config.get("tokenizer") or os.path.join(ROOT, "data", "tokenizer", "tokenizer.model")
    if not os.path.isfile(tokenizer_path):
        raise RunError(f"no tokenizer at {tokenizer_path}")
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    if not config.load_checkpoint:
        raise RunError("predict needs --load_checkpoint (or load_checkpoint in the YAML)")
    model = build_model(config, config.load_checkpoint)
    encoded = [[sp.bos_id()] + sp.encode(p) for p in prompts]
    width = max(map(len, encoded))
    ids = np.zeros((len(encoded), width), np.int32)
    mask = np.zeros((len(encoded), width), np.float32)
    for row, tokens in enumerate(encoded):  # left padding
        ids[row, width - len(tokens):] = tokens
        mask[row, width - len(tokens):] = 1
    out = model.generate(ids, mask, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                         top_k=top_k, top_p=top_p, eos_token_id=sp.eos_id(), pad_token_id=0,
                         seed=int(config.seed or 0))
    for tokens, row in zip(encoded, out):
        new = [int(t) for t in row[width:]]
        if sp.eos_id() in new:
            new = new[:new.index(sp.eos_id())]
        print("> " + sp.decode(tokens[1:] + new), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--run_mode", choices=["train", "finetune", "predict"])
    parser.add_argument("--load_checkpoint")
    parser.add_argument("--resume_training", action="store_true", default=None)
    parser.add_argument("--train_dataset", help="MindRecord file (overrides train_dataset.data_loader.dataset_dir)")
    parser.add_argument("--output_dir")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--predict_data", nargs="+", default=["In the beginning"])
    parser.add_argument("--max_new_tokens", type=int, default=40)
    parser.add_argument("--do_sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    args = parser.parse_args(argv)

    from mixtral_ms.configuration import ConfigError
    from mixtral_ms.data import DataError
    from mixtral_ms.safetensors_io import CheckpointError
    try:
        config = load_config(args.config, {"run_mode": args.run_mode, "load_checkpoint": args.load_checkpoint,
                                           "resume_training": args.resume_training, "output_dir": args.output_dir})
        if args.train_dataset:
            config.train_dataset.data_loader.dataset_dir = args.train_dataset
        if args.epochs:
            config.runner_config.epochs = args.epochs
        for callback in config.callbacks or []:
            if callback.get("type") == "RouterStatsMonitor":
                callback["output_dir"] = config.output_dir
        import mixtral_ms.training  # noqa: F401  (registers model, wrapper and callbacks with MindFormers)
        from mindformers.core.context import build_context
        model_config(config)  # validate before anything is built
        build_context(config)
        import mindspore as ms
        ms.set_seed(int(config.seed or 0))  # before the model is built: initial weights follow the YAML's seed
        if config.run_mode in ("train", "finetune"):
            run_train(config, finetune=config.run_mode == "finetune")
        else:
            run_predict(config, args.predict_data, args.max_new_tokens, args.do_sample, args.temperature,
                        args.top_k, args.top_p)
    except (RunError, ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
