"""Building and executing a run from a MindFormers YAML: what scripts/run_mixtral.py calls.

A run reads its YAML once (run/run_yaml.py: `base_config:` merged as MindFormers' reader merges it), applies
the command line in one place, checks the values before MindFormers is imported (run/checks.py) and the
structure, model config and layout once after (run/yaml_check.py), and builds the model from the config and
the layout together. Training goes through
`mindformers.Trainer` with the YAML's wrapper, optimizer, schedule and callbacks; predict tokenizes with
the SentencePiece model, left-pads the prompts and decodes with the KV cache (mixtral_ms/inference).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Union

from mixtral_ms import ROOT, cli, outputs
from mixtral_ms.parallel.layout import ParallelLayout
from mixtral_ms.run import RunError
from mixtral_ms.run import checks as run_checks
from mixtral_ms.run.run_yaml import apply_settings, read_run_yaml

if TYPE_CHECKING:  # importing MixtralConfig imports MindFormers (seconds): not before the checks
    from mixtral_ms.model.configuration import MixtralConfig

GENERATION_KEYS = {"max_new_tokens": int, "do_sample": bool, "temperature": float, "top_k": int, "top_p": float}


@dataclasses.dataclass
class Run:
    """One run: the MindFormers config (YAML, MindFormers' template, command-line overrides), the
    MixtralConfig it describes and, with `use_parallel`, its layout: both validated once, from the YAML and
    the flags as written (later rewrites for MindFormers' Trainer, such as prepare_wrapper's, come after),
    the model config already holding the fields the layout fixes."""
    config: Any
    model_config: "MixtralConfig"
    layout: Optional[ParallelLayout]


def load_run(source: Union[str, Dict[str, Any]], overrides: Optional[Dict[str, Any]] = None,
             settings: Optional[Mapping[str, Any]] = None) -> Run:
    """A run YAML (its path, or what run_yaml.read_run_yaml read from it) with the dotted `settings` applied
    (run_yaml.apply_settings) and the non-None top-level `overrides` (the command line), checked once (top-level
    keys, registered types, arguments, model_config, layout) and turned into the MindFormerConfig that
    MindFormers' run_mindformer.py builds: the template of the YAML's own run_mode, then the flags."""
    raw = read_run_yaml(source) if isinstance(source, str) else copy.deepcopy(source)
    from mindformers import MindFormerConfig
    from mindformers.tools.register.template import ConfigTemplate
    from mixtral_ms.run.yaml_check import check_config
    apply_settings(raw, settings or {})
    flags = {key: value for key, value in (overrides or {}).items() if value is not None}
    spec = check_config({**raw, **flags})
    if spec.layout is not None:  # the model config, before any model exists, holds what the layout fixes
        for key, value in spec.layout.model_fields().items():
            setattr(spec.model_config, key, value)
        spec.model_config.validate()
    device_unset = "device_target" not in (raw.get("context") or {})
    ConfigTemplate.apply_template(raw)  # what MindFormerConfig(path) does after reading
    config = MindFormerConfig(**raw)
    if device_unset and os.environ.get("DEVICE_TARGET"):
        # The template fills a missing context.device_target with "Ascend", which would hide the
        # DEVICE_TARGET that scripts/msrun_launcher.sh exports (MindFormers reads it only when unset).
        config.context.device_target = os.environ["DEVICE_TARGET"]
    for key, value in flags.items():
        config[key] = value
    return Run(config, spec.model_config, spec.layout)


def build_model(run: Run, checkpoint: Optional[str]):
    """The run's model, filled from `checkpoint` with a strict name and shape check; with a layout,
    sharded by the plan (mixtral_ms/parallel). Under semi-auto parallel each rank reads only its slices,
    when the compiler initialises the parameters (checkpoint/distributed.py SlicedLoad); the checkpoint's
    names, shapes and dtypes are checked here, before the compile."""
    from mixtral_ms.checkpoint.distributed import SlicedLoad
    from mixtral_ms.checkpoint.load import load_weights, resolve_checkpoint
    from mixtral_ms.model.modeling import MixtralForCausalLM
    from mixtral_ms.run.distill import extra_terms
    model = MixtralForCausalLM(run.model_config, extra_terms(run.config))  # every side-channel term, before the plan
    if checkpoint and run.layout is not None and run.layout.parallel_mode == "semi_auto_parallel":
        SlicedLoad(resolve_checkpoint(checkpoint), run.model_config).attach(model)
    elif checkpoint:
        load_weights(model, resolve_checkpoint(checkpoint))
    if run.layout is not None:
        from mixtral_ms.parallel.plan import apply_plan
        apply_plan(model, run.layout, run.config.run_mode)
    return model


def prepare_resume(run: Run, model) -> int:
    """Point MindFormers' resume at exactly one step's checkpoints and return the step.

    MindFormers resumes from a folder of `rank_<i>/` checkpoints, rank i from the newest of its own. A
    single file (named, or the newest under a one-rank folder) is linked alone into
    `<output_dir>/resume_from/rank_0/` so the step resumed is the one asked for, after our strict load
    (a checkpoint of another config fails with a clear message before MindFormers tries). A cluster run's
    folder of per-rank checkpoints (slices under semi-auto parallel) resumes as it is, on as many ranks
    as it holds, all of one step; on another device count it is resharded first (docs/parallel.md)."""
    import mindspore as ms
    from mixtral_ms.checkpoint.distributed import is_rank_folder, rank_files
    from mixtral_ms.checkpoint.load import load_weights, resolve_checkpoint
    config = run.config
    if not config.load_checkpoint:
        raise RunError("resume_training needs load_checkpoint (a training checkpoint file or folder)")
    ranks = rank_files(config.load_checkpoint) if is_rank_folder(config.load_checkpoint) else None
    devices = run.layout.devices if run.layout is not None else 1
    sliced = run.layout is not None and run.layout.parallel_mode == "semi_auto_parallel"
    if ranks is not None and sorted(ranks) != list(range(devices)):
        raise RunError(f"{config.load_checkpoint} holds the checkpoints of {len(ranks)} rank(s), this run has "
                       f"{devices}; reshard them to this run's layout first (scripts/convert_weight.py reshard, "
                       "docs/parallel.md)")
    if ranks is None and sliced:
        raise RunError(f"{config.load_checkpoint} is one complete checkpoint; a semi-auto parallel run resumes "
                       "from per-rank checkpoints: split it with this run's strategy first (scripts/"
                       "convert_weight.py split), or fine-tune from it")
    path = ranks[0] if ranks is not None else resolve_checkpoint(config.load_checkpoint)
    if not path.endswith(".ckpt"):
        raise RunError(f"resume_training needs a MindSpore training checkpoint (.ckpt with optimizer state), "
                       f"got {path}")
    if not sliced:  # (each rank's file holds its slices then: MindFormers loads it into the sliced network)
        load_weights(model, path)
    state = ms.load_checkpoint(path, choice_func=lambda name: name in ("step_num", "epoch_num", "loss_scale"))
    if "step_num" not in state:
        raise RunError(f"{path} holds no training state (step_num); it cannot be resumed, only fine-tuned from")
    # MindFormers restores a dynamic loss scale only for a callback typed `CheckpointMonitor`, which
    # _set_callbacks renames to MixtralCheckpointMonitor: restore it here, or the run resumes at the YAML's
    # initial scale (and overflows and skips steps the uninterrupted run did not).
    scale = (config.get("runner_wrapper") or {}).get("scale_sense")
    if "loss_scale" in state and isinstance(scale, dict):  # dynamic scaling (a fixed scale is unchanged anyway)
        scale["loss_scale_value"] = float(state["loss_scale"].asnumpy().reshape(-1)[0])
    if ranks is None or devices == 1:
        folder = os.path.join(config.output_dir, "resume_from", "rank_0")
        os.makedirs(folder, exist_ok=True)
        for old in os.listdir(folder):
            os.remove(os.path.join(folder, old))
        os.symlink(os.path.abspath(path), os.path.join(folder, os.path.basename(path)))
        config.load_checkpoint = os.path.dirname(folder)
    config.resume_training = True
    return int(state["step_num"].asnumpy().reshape(-1)[0])


def training_data(run: Run) -> int:
    """Check the training set against the config (sequence length, columns, at least one batch);
    returns the steps in an epoch."""
    from mixtral_ms.run.data import DOMAIN_COLUMN, check_dataset
    from mixtral_ms.run.wrapper import prepare_wrapper
    config = run.config
    loader = (config.get("train_dataset") or {}).get("data_loader") or {}
    path = loader.get("dataset_dir")
    if not path:
        raise RunError(f"run_mode {config.run_mode} needs train_dataset.data_loader.dataset_dir (or --train_dataset)")
    prepare_wrapper(config)  # gradient accumulation by MixtralTrainOneStepCell
    teacher = ((config.get("runner_wrapper") or {}).get("distill") or {}).get("teacher")
    if teacher:  # on disk, like the dataset: checked when a run needs it, not when its YAML is read
        from mixtral_ms.checkpoint.load import resolve_checkpoint
        from mixtral_ms.checkpoint.safetensors_io import CheckpointError
        try:
            resolve_checkpoint(teacher)
        except CheckpointError as err:
            raise RunError(f"runner_wrapper.distill.teacher: {err}") from None
    columns = list(config.train_dataset.get("input_columns") or ["input_ids"])
    groups = run.model_config.rre_groups
    if groups > 1 and DOMAIN_COLUMN not in columns:  # else MindFormers never feeds the column the router needs
        raise RunError(f"router_type rre with {groups} expert groups routes by {DOMAIN_COLUMN}, but "
                       f"train_dataset.input_columns ({', '.join(columns)}) leaves it out; add {DOMAIN_COLUMN}")
    samples = check_dataset(path, run.model_config.seq_length, columns, groups)["num_samples"]
    batch = int(config.runner_config.batch_size)
    world = int(os.environ.get("MS_WORKER_NUM") or os.environ.get("RANK_SIZE") or 1) if config.use_parallel else 1
    readers = "ranks"
    layout = run.layout
    if layout is not None and layout.parallel_mode == "semi_auto_parallel":
        # full batch: every rank reads the global batch, batch_size rows per data-parallel shard
        world = layout.data_parallel * layout.micro_batch_interleave_num * \
            (layout.micro_batch_num if layout.pipeline_stage > 1 else 1)
        readers = "data-parallel shards, micro-batches and copies"
    steps = samples // (batch * world)
    if steps == 0:
        per_step = f"{batch} x {world} {readers}" if world > 1 else str(batch)
        raise RunError(f"{path} holds {samples} samples, fewer than one batch ({per_step}): no step would run; "
                       f"lower runner_config.batch_size")
    return steps


def _set_callbacks(config, initial_step: int) -> None:
    """Our callbacks count steps from `initial_step` (a resume's); MindFormers' CheckpointMonitor runs as
    its subclass MixtralCheckpointMonitor, which names files by that step and saves only healthy weights."""
    for callback in config.callbacks or []:
        if callback.get("type") == "CheckpointMonitor":
            callback["type"] = "MixtralCheckpointMonitor"
        if callback.get("type") in ("MixtralProgressMonitor", "RouterStatsMonitor", "MixtralCheckpointMonitor"):
            callback["initial_step"] = initial_step


def train(run: Run, finetune: bool, steps_per_epoch: int) -> None:
    """Trainer.train / finetune on the run's model, its checkpoint loaded strictly first (or resumed)."""
    from mindformers import Trainer
    config = run.config
    if config.resume_training:
        model = build_model(run, None)
        step = prepare_resume(run, model)
        epochs = int(config.runner_config.epochs)
        if step >= epochs * steps_per_epoch:
            raise RunError(f"the checkpoint is at step {step}, the end of this run ({epochs} epoch(s) of "
                           f"{steps_per_epoch} steps); raise --epochs to train further")
        _set_callbacks(config, step)
        print(f"resuming from step {step}", flush=True)
        Trainer(args=config, model=model).train()  # MindFormers restores weights, optimizer, step, data position
        return
    model = build_model(run, config.load_checkpoint or None)
    config.load_checkpoint = ""  # loaded above, strictly; MindFormers must not load it again
    _set_callbacks(config, 0)
    trainer = Trainer(args=config, model=model)
    (trainer.finetune if finetune else trainer.train)()


def generation_settings(config: Mapping, requested: Dict[str, Any]) -> Dict[str, Any]:
    """Decoding settings: defaults, then the YAML's `generation:` section, then the non-None `requested`;
    checked (run_checks.check_generation)."""
    settings = {"max_new_tokens": 40, "do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    section = config.get("generation") or {}
    unknown = sorted(set(section) - set(GENERATION_KEYS))
    if unknown:
        raise RunError(f"unknown key(s) {unknown} in generation (known: {sorted(GENERATION_KEYS)})")
    for key, value in section.items():
        if not isinstance(value, GENERATION_KEYS[key]) and not (GENERATION_KEYS[key] is float and
                                                                run_checks.is_number(value)):
            raise RunError(f"generation.{key} must be a {GENERATION_KEYS[key].__name__}, got {value!r}")
        settings[key] = value
    settings.update({k: v for k, v in requested.items() if v is not None})
    run_checks.check_generation(settings)
    return settings


def predict(run: Run, prompts: Sequence[str], settings: Dict[str, Any], instruct: bool = False) -> None:
    """Print `> prompt + continuation` for each prompt (SentencePiece, left padding, KV-cache decoding)."""
    import sentencepiece as spm
    config = run.config
    tokenizer_path = config.get("tokenizer") or os.path.join(ROOT, "data", "tokenizer", "tokenizer.model")
    if not os.path.isabs(tokenizer_path) and not os.path.isfile(tokenizer_path):
        tokenizer_path = os.path.join(ROOT, tokenizer_path)
    if not os.path.isfile(tokenizer_path):
        raise RunError(f"no tokenizer at {tokenizer_path}")
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    if not config.load_checkpoint:
        raise RunError("predict needs --load_checkpoint (or load_checkpoint in the YAML)")
    if sp.get_piece_size() > run.model_config.vocab_size:
        raise RunError(f"the tokenizer {tokenizer_path} has {sp.get_piece_size()} pieces but the model's "
                       f"vocab_size is {run.model_config.vocab_size}")
    if instruct:  # the Mixtral-Instruct template the fine-tuning data was rendered with (mixtral_ms/run/data.py)
        prompts = [f"[INST] {p} [/INST]" for p in prompts]
    encoded = [[sp.bos_id()] + sp.encode(p) for p in prompts]
    longest, limit = max(map(len, encoded)), run.model_config.max_position_embeddings
    if longest + settings["max_new_tokens"] > limit:
        raise RunError(f"a prompt of {longest} tokens + max_new_tokens {settings['max_new_tokens']} exceeds "
                       f"max_position_embeddings {limit}")
    from mixtral_ms.inference.generation import generate
    from mixtral_ms.inference.prompts import continuation, left_pad
    model = build_model(run, config.load_checkpoint)
    pad = max(sp.pad_id(), 0)
    ids, mask = left_pad(encoded, pad)
    out = generate(model, ids, mask, eos_token_id=sp.eos_id(), pad_token_id=pad, seed=int(config.seed or 0),
                   **settings)
    for tokens, row in zip(encoded, out):
        print("> " + sp.decode(tokens[1:] + continuation(row, ids.shape[1], sp.eos_id())), flush=True)


def _check_before_import(args: argparse.Namespace, config: Mapping) -> Dict[str, Any]:
    """What a plain read of the YAML can refuse; returns the decoding settings."""
    run_checks.check_values(config)
    settings = generation_settings(config, {k: getattr(args, k) for k in GENERATION_KEYS})
    mode = args.run_mode or config.get("run_mode")
    positions = ((config.get("model") or {}).get("model_config") or {}).get("max_position_embeddings")
    if mode == "predict" and isinstance(positions, int) and settings["max_new_tokens"] >= positions:
        raise RunError(f"max_new_tokens {settings['max_new_tokens']} leaves no room for a prompt within "
                       f"max_position_embeddings {positions}")
    loader = (config.get("train_dataset") or {}).get("data_loader") if isinstance(config.get("train_dataset"),
                                                                                 Mapping) else None
    if mode in ("train", "finetune") and args.train_dataset and not isinstance(loader, Mapping):
        raise RunError(f"--train_dataset needs a train_dataset.data_loader section in {args.config} (a "
                       f"run_mode {config.get('run_mode')} YAML without one?); start from a training YAML")
    return settings


def execute(args: argparse.Namespace) -> None:
    """Run what the parsed command line asks; raises a cli.BadInput (RunError, ConfigError, DataError, CheckpointError, ParallelConfigError) for bad input.

    Flags override the YAML (`--run_mode` over `run_mode`, as in MindFormers' run_mindformer.py). The
    YAML's values, the arguments and the output folder are checked before MindFormers is imported;
    MindFormers' log folder (LOCAL_DEFAULT_PATH, read at import) is put under the run's output_dir."""
    raw = read_run_yaml(args.config)  # the only read: base_config: files merged
    decoding = _check_before_import(args, raw)
    output_dir = run_checks.output_dir(args.output_dir, raw)
    if (args.run_mode or raw.get("run_mode")) == "eval":  # where the result goes: known before any forward pass
        outputs.file_target(args.eval_output or os.path.join(output_dir, "eval.json"), "eval output")
    run_checks.prepare_output_dir(output_dir)
    os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.abspath(output_dir))
    nested = {"train_dataset.data_loader.dataset_dir": args.train_dataset, "runner_config.epochs": args.epochs}
    run = load_run(raw, {"run_mode": args.run_mode, "load_checkpoint": args.load_checkpoint,
                         "resume_training": args.resume_training, "output_dir": args.output_dir},
                   {key: value for key, value in nested.items() if value})  # the command line, in one place
    config = run.config
    run_checks.check_distributed_launch(config)  # after the YAML check: a bad layout is named first
    for callback in config.callbacks or []:
        if callback.get("type") == "RouterStatsMonitor" and (args.output_dir or "output_dir" not in callback):
            callback["output_dir"] = config.output_dir
    if config.run_mode not in ("train", "finetune", "predict", "eval"):
        raise RunError(f"run_mode must be train, finetune, predict or eval, got {config.run_mode!r}")
    steps_per_epoch = training_data(run) if config.run_mode in ("train", "finetune") else 0
    import mindspore as ms
    from mindformers.core.context import build_context
    build_context(config)
    if (config.get("context") or {}).get("mode") is not None:  # MindFormers' context is built once per
        ms.set_context(mode=int(config.context.mode))           # process; a later run keeps its own mode
    ms.set_seed(int(config.seed or 0))  # before the model is built: initial weights follow the YAML's seed
    if run.layout is not None:  # the layout against the world size; the auto-parallel context
        from mixtral_ms.parallel.plan import prepare_parallel
        prepare_parallel(config, run.layout)
    if config.run_mode in ("train", "finetune"):
        train(run, config.run_mode == "finetune", steps_per_epoch)
    elif config.run_mode == "eval":
        from mixtral_ms.tools.evaluate import run_eval
        run_eval(config, lambda checkpoint: build_model(run, checkpoint), args.eval_dataset, args.eval_output,
                 args.eval_samples)
    else:
        predict(run, args.predict_data, decoding, args.instruct)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv: Optional[Sequence[str]] = None, description: Optional[str] = None) -> int:
    """The command line of scripts/run_mixtral.py (`description`: its usage text); 2 on bad input,
    128 + the signal number after SIGINT / SIGTERM."""
    parser = cli.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--run_mode", choices=["train", "finetune", "predict", "eval"])
    parser.add_argument("--load_checkpoint", help="checkpoint file or folder (overrides the YAML)")
    parser.add_argument("--resume_training", action="store_true", default=None,
                        help="also restore optimizer state, step and data position from load_checkpoint")
    parser.add_argument("--train_dataset", help="MindRecord file (overrides train_dataset.data_loader.dataset_dir)")
    parser.add_argument("--output_dir")
    parser.add_argument("--epochs", type=_positive)
    parser.add_argument("--predict_data", nargs="+", default=["In the beginning"])
    parser.add_argument("--instruct", action="store_true",
                        help="wrap each prompt in Mixtral-Instruct's [INST] ... [/INST] (fine-tuned models)")
    parser.add_argument("--eval_dataset", help="eval: the MindRecord to score (CE and perplexity, no gradients)")
    parser.add_argument("--eval_output", help="eval: the JSON written (default <output_dir>/eval.json)")
    parser.add_argument("--eval_samples", type=_positive, help="eval: only the first N samples")
    parser.add_argument("--max_new_tokens", type=int)
    parser.add_argument("--do_sample", action="store_true", default=None)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top_k", type=int)
    parser.add_argument("--top_p", type=float)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help (0) or a bad flag (2, one line): a status, also when called in-process
        return int(done.code or 0)
    # SIGTERM unwinds like Ctrl-C (a checkpoint being written is removed: MixtralCheckpointMonitor); bad
    # input (cli.BadInput) is one line: the tools' one runner, mixtral_ms/cli.py
    return cli.run(execute, args, interrupted="interrupted by {signal}", temp_logs=False)
