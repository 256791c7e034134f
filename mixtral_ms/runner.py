"""Building and executing a run from a MindFormers YAML: what scripts/run_mixtral.py calls.

A run reads its YAML once (MindFormers' reader, so `base_config:` inheritance resolves), checks it
(mixtral_ms/training/yaml_check.py), builds its MixtralConfig once, and with `use_parallel` validates the
layout before the model is built from the config and the layout together. Training goes through
`mindformers.Trainer` with the YAML's wrapper, optimizer, schedule and callbacks; predict tokenizes with
the SentencePiece model, left-pads the prompts and decodes with the KV cache (mixtral_ms/inference).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
from typing import Any, Dict, Optional, Sequence

from .configuration import MixtralConfig
from .data import DataError
from .parallel.config import ParallelConfigError, ParallelLayout
from .safetensors_io import CheckpointError
from .schema import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATION_KEYS = {"max_new_tokens": int, "do_sample": bool, "temperature": float, "top_k": int, "top_p": float}


class RunError(Exception):
    """A run that cannot start: bad YAML, dataset or checkpoint."""


# Every error a run reports as one line `error: ...` (exit status 2).
RUN_ERRORS = (RunError, ConfigError, DataError, CheckpointError, ParallelConfigError)


@dataclasses.dataclass
class Run:
    """One run: the MindFormers config (YAML, MindFormers' template, command-line overrides), the
    MixtralConfig it describes and, with `use_parallel`, the validated layout."""
    config: Any
    model_config: MixtralConfig
    layout: Optional[ParallelLayout] = None


def load_run(path: str, overrides: Optional[Dict[str, Any]] = None) -> Run:
    """The YAML read once and checked (top-level keys, registered types, arguments, model_config), as
    `MindFormerConfig(path)` reads it, with the non-None `overrides` set on top."""
    import yaml
    from mindformers import MindFormerConfig
    from mindformers.tools.register.template import ConfigTemplate
    from .training import check_config
    if not os.path.isfile(path):
        raise RunError(f"no config file {path}")
    try:
        raw = MindFormerConfig._file2dict(path)  # MindFormers' reader: the YAML plus its base_config files
    except UnicodeDecodeError:
        raise RunError(f"{path}: not UTF-8 text") from None
    except (yaml.YAMLError, ValueError) as err:  # the reader's nesting check wraps YAMLError in ValueError
        cause = err if isinstance(err, yaml.YAMLError) else err.__cause__
        if not isinstance(cause, yaml.YAMLError):
            raise RunError(f"{path}: {err}") from None
        mark = getattr(cause, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RunError(f"{path}: malformed YAML{where}") from None
    except AttributeError:  # the reader sorts the top-level items of what it loaded
        raise RunError(f"{path}: the YAML must be a mapping of sections") from None
    model_config = check_config(raw)
    ConfigTemplate.apply_template(raw)  # what MindFormerConfig(path) does after reading
    config = MindFormerConfig(**raw)
    for key, value in (overrides or {}).items():
        if value is not None:
            config[key] = value
    return Run(config, model_config)


def set_layout(run: Run, layout: ParallelLayout) -> None:
    """Give the run its layout, and the model config the fields the layout fixes (before any model exists)."""
    for key, value in layout.model_fields().items():
        setattr(run.model_config, key, value)
    run.model_config.validate()
    run.layout = layout


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


def build_model(run: Run, checkpoint: Optional[str]):
    """The run's model, filled from `checkpoint` with a strict name and shape check; with a layout,
    sharded by the plan (mixtral_ms/parallel)."""
    from .checkpoint import load_weights
    from .modeling import MixtralForCausalLM
    model = MixtralForCausalLM(run.model_config)
    if checkpoint:
        load_weights(model, resolve_checkpoint(checkpoint))
    if run.layout is not None:
        from .parallel.plan import apply_plan
        apply_plan(model, run.layout, run.config.run_mode)
    return model


def prepare_resume(config, model) -> int:
    """Point MindFormers' resume at exactly one checkpoint file and return its step.

    MindFormers resumes from a folder of `rank_<i>/` checkpoints and picks the newest; the file the user
    names (or the newest under the folder) is linked alone into `<output_dir>/resume_from/rank_0/` so the
    step resumed is the one asked for. The weights are first loaded with our strict check, so a
    checkpoint from another config fails with a clear message before MindFormers tries."""
    import mindspore as ms
    from .checkpoint import load_weights
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


def train(run: Run, finetune: bool) -> None:
    """Trainer.train / finetune on the run's model, its checkpoint loaded strictly first (or resumed)."""
    from mindformers import Trainer
    from .data import check_dataset
    config = run.config
    columns = list(config.train_dataset.get("input_columns") or ["input_ids"])
    check_dataset(config.train_dataset.data_loader.dataset_dir, run.model_config.seq_length, columns)
    if config.resume_training:
        model = build_model(run, None)
        step = prepare_resume(config, model)
        for callback in config.callbacks or []:
            if callback.get("type") in ("MixtralProgressMonitor", "RouterStatsMonitor"):
                callback["initial_step"] = step
        print(f"resuming from step {step}", flush=True)
        Trainer(args=config, model=model).train()  # MindFormers restores weights, optimizer, step, data position
        return
    model = build_model(run, config.load_checkpoint or None)
    config.load_checkpoint = ""  # loaded above, strictly; MindFormers must not load it again
    trainer = Trainer(args=config, model=model)
    (trainer.finetune if finetune else trainer.train)()


def generation_settings(config, requested: Dict[str, Any]) -> Dict[str, Any]:
    """Decoding settings: defaults, then the YAML's `generation:` section, then the non-None `requested`."""
    settings = {"max_new_tokens": 40, "do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    section = config.get("generation") or {}
    unknown = sorted(set(section) - set(GENERATION_KEYS))
    if unknown:
        raise RunError(f"unknown key(s) {unknown} in generation (known: {sorted(GENERATION_KEYS)})")
    settings.update({k: GENERATION_KEYS[k](v) for k, v in section.items()})
    settings.update({k: v for k, v in requested.items() if v is not None})
    return settings


def predict(run: Run, prompts: Sequence[str], settings: Dict[str, Any], instruct: bool = False) -> None:
    """Print `> prompt + continuation` for each prompt (SentencePiece, left padding, KV-cache decoding)."""
    import sentencepiece as spm
    from .inference.generation import generate
    from .inference.prompts import continuation, left_pad
    config = run.config
    tokenizer_path = config.get("tokenizer") or os.path.join(ROOT, "data", "tokenizer", "tokenizer.model")
    if not os.path.isabs(tokenizer_path) and not os.path.isfile(tokenizer_path):
        tokenizer_path = os.path.join(ROOT, tokenizer_path)
    if not os.path.isfile(tokenizer_path):
        raise RunError(f"no tokenizer at {tokenizer_path}")
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    if not config.load_checkpoint:
        raise RunError("predict needs --load_checkpoint (or load_checkpoint in the YAML)")
    model = build_model(run, config.load_checkpoint)
    if sp.get_piece_size() > model.config.vocab_size:
        raise RunError(f"the tokenizer {tokenizer_path} has {sp.get_piece_size()} pieces but the model's "
                       f"vocab_size is {model.config.vocab_size}")
    if instruct:  # the Mixtral-Instruct template the fine-tuning data was rendered with (mixtral_ms/data.py)
        prompts = [f"[INST] {p} [/INST]" for p in prompts]
    encoded = [[sp.bos_id()] + sp.encode(p) for p in prompts]
    pad = max(sp.pad_id(), 0)
    ids, mask = left_pad(encoded, pad)
    out = generate(model, ids, mask, eos_token_id=sp.eos_id(), pad_token_id=pad, seed=int(config.seed or 0),
                   **settings)
    for tokens, row in zip(encoded, out):
        print("> " + sp.decode(tokens[1:] + continuation(row, ids.shape[1], sp.eos_id())), flush=True)


def execute(args: argparse.Namespace) -> None:
    """Run what the parsed command line asks; raises one of RUN_ERRORS for bad input."""
    run = load_run(args.config, {"run_mode": args.run_mode, "load_checkpoint": args.load_checkpoint,
                                 "resume_training": args.resume_training, "output_dir": args.output_dir})
    config = run.config
    if args.train_dataset:
        config.train_dataset.data_loader.dataset_dir = args.train_dataset
    if args.epochs:
        config.runner_config.epochs = args.epochs
    for callback in config.callbacks or []:
        if callback.get("type") == "RouterStatsMonitor" and (args.output_dir or "output_dir" not in callback):
            callback["output_dir"] = config.output_dir
    settings = generation_settings(config, {k: getattr(args, k) for k in GENERATION_KEYS})
    import mindspore as ms
    from mindformers.core.context import build_context
    build_context(config)
    if (config.get("context") or {}).get("mode") is not None:  # MindFormers' context is built once per
        ms.set_context(mode=int(config.context.mode))           # process; a later run keeps its own mode
    ms.set_seed(int(config.seed or 0))  # before the model is built: initial weights follow the YAML's seed
    if config.use_parallel:  # validate the layout against the world size, set the auto-parallel context
        from .parallel.plan import prepare_parallel
        set_layout(run, prepare_parallel(config))
    if config.run_mode in ("train", "finetune"):
        train(run, config.run_mode == "finetune")
    elif config.run_mode == "predict":
        predict(run, args.predict_data, settings, args.instruct)
    elif config.run_mode == "eval":
        from .evaluate import run_eval
        run_eval(config, lambda checkpoint: build_model(run, checkpoint), args.eval_dataset, args.eval_output,
                 args.eval_samples)
    else:
        raise RunError(f"run_mode must be train, finetune, predict or eval, got {config.run_mode!r}")


def main(argv: Optional[Sequence[str]] = None, description: Optional[str] = None) -> int:
    """The command line of scripts/run_mixtral.py (`description`: its usage text); 2 on bad input."""
    import sys
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    try:
        execute(parser.parse_args(argv))
    except RUN_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
