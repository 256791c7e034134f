"""Training callbacks: progress (loss, aux losses, tokens/s, ETA), router statistics to JSONL, and
checkpoints named by their step that are saved only with healthy weights.

Both read what the train network leaves behind: its outputs (loss, overflow, loss scale, lr, global
norm, the layout of MixtralTrainOneStepCell and of MindFormers' train-one-step and pipeline cells) and
the model's side channel (mixtral_ms.model.losses.TrainingStats: every loss term, tokens per expert and
dropped assignments per layer of the step), which survives every wrapper. The channel is read once per
step, by the first callback to ask (`step_stats`, TrainingStats.read_and_reset), and every callback gets
that one read, so under any wrapper each step reports its own statistics; terms are means over the step's
forward passes (micro-batches, interleaved copies).

Steps are numbered from the start of training, also in a resumed run: MindFormers restarts the
callbacks' step count at 1 after a resume, so the run's first step is offset by `initial_step`
(run_mixtral.py passes the resumed checkpoint's step_num), or else by the optimizer's restored
global_step (equal unless fp16 overflow skipped updates).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import List, Optional

import numpy as np

import mindspore as ms
from mindspore import Tensor, ops
from mindspore.train.callback import Callback
from mindformers.core.callback import CheckpointMonitor
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mixtral_ms.checkpoint.name_map import FREEZE_MASK_PREFIX, TRAINING_STATE_SUFFIXES
from mixtral_ms.model.losses import LOSS_TERMS
from mixtral_ms.model.schema import moe_layers
from mixtral_ms.run import RunError
from mixtral_ms.run.wrapper import MixtralTrainOneStepCell, side_channel_model


def step_stats(cb_params) -> Optional[dict]:
    """This step's side-channel values (TrainingStats.read_and_reset), read once per step and shared by
    every callback; None if the train network holds no MixtralForCausalLM."""
    step = int(cb_params.cur_step_num)
    cached = cb_params.get("mixtral_step_stats", None)
    if cached is not None and cached[0] == step:
        return cached[1]
    network = cb_params.get("train_network", None)
    model = side_channel_model(network) if network is not None else None
    values = model.training_stats.read_and_reset() if model is not None else None
    if values is not None and not isinstance(network, MixtralTrainOneStepCell):
        # another wrapper (MindFormers' pipeline wrapper among them): aux-loss-free balancing's once-per-step
        # bias update is done here, each router on the tokens it counted (on its own pipeline stage)
        if model.bias_rate > 0:
            keep = 0.0 if _outputs(cb_params)[1] else 1.0
            model.update_expert_bias(Tensor(keep, ms.float32))
    cb_params.mixtral_step_stats = (step, values)
    return values


def _outputs(cb_params):
    """(loss, overflow, loss scale, lr, global norm) from the train network's outputs, as MFLossMonitor
    reads them; fields a wrapper does not return are NaN / False."""
    outputs = cb_params.net_outputs
    if not isinstance(outputs, (tuple, list)):
        outputs = (outputs,)
    values = [_scalar(x) if x is not None else float("nan") for x in outputs[:5]]
    values += [float("nan")] * (5 - len(values))
    loss, overflow, scale, lr, norm = values
    return loss, overflow == overflow and bool(overflow), scale, lr, norm


def _scalar(value) -> float:
    value = value.asnumpy() if hasattr(value, "asnumpy") else value
    return float(np.asarray(value).reshape(-1)[0])


def _start_step(cb, initial_step: Optional[int]) -> int:
    """The global step before this run's first (see the module docstring)."""
    if initial_step is not None:
        return int(initial_step)
    if cb.get("initial_step", None):
        return int(cb.initial_step)
    optimizer = cb.get("optimizer", None) or getattr(cb.get("train_network", None), "optimizer", None)
    step = getattr(optimizer, "global_step", None)
    return int(_scalar(step)) if step is not None else 0


class _StepCounter(Callback):
    """Global step numbers (see the module docstring) and the run's total."""

    def __init__(self, initial_step: Optional[int] = None) -> None:
        super().__init__()
        self.initial_step = initial_step
        self.offset = 0

    def on_train_begin(self, run_context):
        self.offset = _start_step(run_context.original_args(), self.initial_step)

    def step(self, cb) -> int:
        return self.offset + int(cb.cur_step_num)

    def total(self, cb) -> int:
        """All steps of training: this run's epochs plus the ones a resume skipped."""
        batches = int(cb.batch_num)
        return batches * (int(cb.epoch_num) + self.offset // max(batches, 1))

    def is_log_step(self, cb, interval: int) -> bool:
        step = self.step(cb)
        return step % interval == 0 or step == self.total(cb) or step == self.offset + 1


@MindFormerRegister.register(MindFormerModuleType.CALLBACK)
class MixtralProgressMonitor(_StepCounter):
    """Every `log_interval` steps (and at the first and last): step, loss, CE, aux loss, z-loss, the
    distillation term (kd, when the wrapper distils), lr,
    gradient norm, tokens/s and ETA, one line on stdout. The first step of a run includes graph
    compilation, so it reports that time instead of a rate; rates and ETA come from later steps."""

    def __init__(self, log_interval: int = 10, initial_step: Optional[int] = None) -> None:
        super().__init__(initial_step)
        self.log_interval = max(1, int(log_interval))
        self.begin: Optional[float] = None
        self.last: Optional[float] = None
        self.last_step = 0
        self.history = []

    def on_train_begin(self, run_context):
        super().on_train_begin(run_context)
        self.begin = time.time()

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        step = self.step(cb)
        loss, overflow, scale, lr, norm = _outputs(cb)
        values = step_stats(cb)
        terms = {t: float("nan") for t in LOSS_TERMS}
        terms.update(values["terms"] if values else {})
        self.history.append({"step": step, "loss": loss, **terms, "overflow": bool(overflow), "loss_scale": scale})
        if not self.is_log_step(cb, self.log_interval):
            return
        now = time.time()
        total = self.total(cb)
        if self.last is None:  # the run's first step: compile + one step
            compiled = " (graph compile)" if ms.get_context("mode") == ms.GRAPH_MODE else ""
            speed = f"first step {now - self.begin:.1f} s{compiled}"
        else:
            dataset = cb.train_dataset
            tokens = dataset.get_batch_size() * int(np.prod(dataset.output_shapes()[0][1:]))
            steps = max(step - self.last_step, 1)
            per_step = (now - self.last) / steps
            speed = f"{tokens / max(per_step, 1e-9):,.0f} tokens/s | ETA {_duration((total - step) * per_step)}"
        flags = f" | overflow: step skipped, loss scale {scale:g}" if overflow else ""
        extra = "".join(f" | {t.removesuffix('_loss')} {v:.4f}" for t, v in terms.items() if t not in LOSS_TERMS)
        print(f"step {step}/{total} | loss {loss:.4f} | ce {terms['ce_loss']:.4f} | aux {terms['aux_loss']:.4f} | "
              f"z {terms['z_loss']:.3f}{extra} | lr {lr:.2e} | grad_norm {norm:.3f} | {speed}{flags}", flush=True)
        self.last, self.last_step = now, step


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@MindFormerRegister.register(MindFormerModuleType.CALLBACK)
class RouterStatsMonitor(_StepCounter):
    """Every `log_interval` steps (and at the first and last), per layer: tokens routed to each expert,
    the fraction of assignments dropped for lack of capacity, plus the aux and z loss of that step.

    Appends one JSON object per logged step to `<output_dir>/router_stats.jsonl`:
      {"step", "tokens_per_expert": [L][E], "dropped_per_expert": [L][E], "dropped_fraction": [L],
       "aux_loss", "z_loss", "loss", "ce_loss", "overflow", "loss_scale"} (plus any further loss term
    of the side channel, by name; L rows, one per MoE layer, and with a layer pattern `"layers"`: the
    model's index of each row's layer)
    (a fresh run starts the file anew; a resumed run drops the records after its starting step), and
    prints a line per layer when `verbose`. `scripts/plot_router.py` turns the file into a heatmap.
    """

    def __init__(self, output_dir: str = "./output", log_interval: int = 10, verbose: bool = True,
                 initial_step: Optional[int] = None) -> None:
        super().__init__(initial_step)
        self.path = os.path.join(output_dir, "router_stats.jsonl")
        self.log_interval = max(1, int(log_interval))
        self.verbose = bool(verbose)
        self.active = True
        self.layers: Optional[List[int]] = None  # the model's layer of each row, when not every layer is MoE

    def on_train_begin(self, run_context):
        super().on_train_begin(run_context)
        network = run_context.original_args().get("train_network", None)
        model = side_channel_model(network) if network is not None else None
        self.active = model is not None
        if not self.active:
            print("RouterStatsMonitor: the train network holds no MixtralForCausalLM; no router statistics",
                  file=sys.stderr, flush=True)
            return
        sparse = list(moe_layers(model.config))
        self.layers = sparse if sparse != list(range(model.config.num_hidden_layers)) else None
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        kept = []
        if self.offset and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= self.offset]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        if not self.active:
            return
        values = step_stats(cb)  # every step, so that each logged step reports its own statistics
        if not self.is_log_step(cb, self.log_interval):
            return
        step = self.step(cb)
        loss, overflow, scale, _, _ = _outputs(cb)
        load, dropped = values["expert_load"], values["dropped"]
        fraction = dropped.sum(-1) / np.maximum(load.sum(-1), 1)
        terms = dict(values["terms"])
        record = {
            "step": step,
            "tokens_per_expert": load.round().astype(int).tolist(),
            "dropped_per_expert": dropped.round().astype(int).tolist(),
            "dropped_fraction": fraction.round(6).tolist(),
            "aux_loss": terms.pop("aux_loss"), "z_loss": terms.pop("z_loss"),
            "loss": loss, "ce_loss": terms.pop("ce_loss"), "overflow": overflow, "loss_scale": scale, **terms,
        }
        if self.layers is not None:
            record["layers"] = self.layers
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.verbose:
            width = len(str(int(load.max()))) if load.size else 1
            lines = [f"  router step {step} | aux {record['aux_loss']:.4f} | z {record['z_loss']:.3f}"]
            for layer, row, frac in zip(self.layers or range(len(load)), load.astype(int), fraction):
                counts = " ".join(f"{int(c):>{width}d}" for c in row)
                lines.append(f"    layer {layer}: tokens/expert [{counts}] | dropped {100 * frac:.1f}%")
            print("\n".join(lines), file=sys.stdout, flush=True)


@MindFormerRegister.register(MindFormerModuleType.CALLBACK)
class MixtralCheckpointMonitor(CheckpointMonitor):
    """MindFormers' CheckpointMonitor (same arguments, same files: `<prefix>_rank_<r>-<epoch>_<step in epoch>.ckpt`
    with step_num, epoch_num, global_step and loss_scale for a resume), fixed for resumed and interrupted runs:

    - files are named and triggered by the global step, also after a resume (MindFormers restarts the count
      at 1 and names step 32 `-4_8` after resuming from step 24); `initial_step` as in MixtralProgressMonitor;
    - a resumed run keeps the prefix (MindSpore would switch to `<prefix>_1` beside the existing files, which
      then escape keep_checkpoint_max); a fresh run in a folder with checkpoints still gets `<prefix>_1`, so
      it never overwrites another run's files;
    - at most `keep_checkpoint_max` of the prefix stay in the folder after every save (the oldest go, as
      many as needed, not one per save);
    - before saving, every weight must be finite and at most `max_weight_abs` in magnitude: otherwise the
      run stops with RunError (one line) instead of saving a diverged model over the good ones;
    - MindSpore writes `<name>.tmp` and renames it; a save interrupted by an exception (SIGTERM, see
      cli.Interrupted) removes its `.tmp`, and a run starting in the folder removes the `.tmp` files of
      this prefix that a killed run (SIGKILL) left.

    run_mixtral.py runs every `CheckpointMonitor` of a YAML as this class.
    """

    def __init__(self, *args, initial_step: Optional[int] = None, max_weight_abs: float = 1.0e4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.run_prefix = f"{self.origin_prefix}_rank_{self.rank_id}"  # before MindSpore's `_<n>` suffix
        self.initial_step = initial_step
        self.max_weight_abs = float(max_weight_abs)
        self.offset = 0
        self._append_step_num = 0  # the global step comes from `offset`, not from MindFormers' append_info
        self.filter_list.append(FREEZE_MASK_PREFIX)  # freeze masks come from the YAML, never from a checkpoint
        self.filter_list.extend(TRAINING_STATE_SUFFIXES)  # a router's count of the step's tokens: zero between steps

    def on_train_begin(self, run_context):
        super().on_train_begin(run_context)
        self.offset = _start_step(run_context.original_args(), self.initial_step)
        if self.offset:
            self._prefix = self.run_prefix
        if os.path.isdir(self._directory):
            for name in os.listdir(self._directory):
                if name.startswith(self.run_prefix) and name.endswith(".tmp"):
                    os.remove(os.path.join(self._directory, name))

    def _check_save_ckpt(self, cb_params, force_to_save):
        every = self._config.save_checkpoint_steps
        if every and not force_to_save:
            return (self.offset + cb_params.cur_step_num) % every == 0
        return super()._check_save_ckpt(cb_params, force_to_save)

    def _check_weights(self, cb_params, step: int) -> None:
        optimizer = cb_params.get("optimizer", None)  # its parameters are exactly the weights trained
        params = optimizer.parameters if optimizer is not None else cb_params.train_network.trainable_params()
        peak, peak_name = 0.0, None
        for param in params:
            if not bool(ops.isfinite(param).all()):
                raise RunError(f"not saving the step {step} checkpoint: {param.name} holds NaN or inf; training "
                               f"diverged (lower the learning rate); last saved: {self._last_saved()}")
            value = float(ops.abs(param).max())
            if value > peak:
                peak, peak_name = value, param.name
        if peak > self.max_weight_abs:
            raise RunError(f"not saving the step {step} checkpoint: |{peak_name}| reaches {peak:.3g} > max_weight_abs "
                           f"{self.max_weight_abs:g}; training diverged (lower the learning rate); "
                           f"last saved: {self._last_saved()}")

    def _last_saved(self) -> str:
        return getattr(self, "_latest_ckpt_file_name", "") or "none"

    def save_checkpoint(self, cb_params):
        step = self.offset + cb_params.cur_step_num
        self._check_weights(cb_params, step)
        # The parent names the file after cur_epoch_num / cur_step_num: give it the global ones meanwhile.
        relative = cb_params.cur_step_num, cb_params.cur_epoch_num
        epoch, in_epoch = (step - 1) // cb_params.batch_num + 1, (step - 1) % cb_params.batch_num + 1
        partial = os.path.join(self._directory, f"{self._prefix}-{epoch}_{in_epoch}.tmp")
        cb_params.cur_step_num, cb_params.cur_epoch_num = step, epoch
        try:
            super().save_checkpoint(cb_params)
        except BaseException:
            if os.path.exists(partial):
                os.remove(partial)
            raise
        finally:
            cb_params.cur_step_num, cb_params.cur_epoch_num = relative
            self._last_triggered_step = relative[0]
        self._keep_newest()

    def _keep_newest(self) -> None:
        keep = self._config.keep_checkpoint_max
        pattern = re.compile(re.escape(self._prefix) + r"-\d+_\d+\." + re.escape(self._config.format) + "$")
        files = [os.path.join(self._directory, n) for n in os.listdir(self._directory) if pattern.match(n)]
        files.sort(key=lambda f: (os.path.getmtime(f), f))
        for old in files[:-keep] if keep and keep > 0 else []:
            os.remove(old)
