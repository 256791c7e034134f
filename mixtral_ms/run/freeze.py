"""Freezing parts of the model for continual training (Lifelong-MoE): chosen experts, chosen router
rows, everything outside the MoE blocks. The run YAML names them under the wrapper:

  runner_wrapper:
    type: MixtralTrainOneStepCell
    freeze:
      experts: [0, 1, 2, 3]        # these experts in every layer, or per layer: {0: [0, 1], 1: [3]}
      router_rows: [0, 1, 2, 3]    # these rows of every layer's gate (same two forms)
      non_moe: True                # embeddings, attention, norms, final norm, lm_head

Frozen means bit-identical after training: a zero gradient alone is not enough, since AdamW's weight
decay and moments carried from earlier steps still move a weight. So the gradients of frozen elements
are zeroed (they take no part in the global norm, clipping or the moments' new terms), and after the
optimizer step the frozen elements get their values from before the step back: the update is masked.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

import mindspore as ms
from mindspore import ParameterTuple, Tensor, nn, ops

from mixtral_ms.checkpoint.name_map import FREEZE_MASK_PREFIX, Kind, parse
from mixtral_ms.model.schema import ConfigError

FREEZE_KEYS = ("experts", "router_rows", "non_moe")
_ROWS = {Kind.EXPERTS: "experts", Kind.ROUTER: "router_rows"}  # parameters frozen by rows: the spec's key


def _per_layer(where: str, value: Any, layers: int, experts: int) -> Dict[int, List[int]]:
    """A list (every layer) or {layer: list} of expert ids -> {layer: sorted ids}, checked."""
    if isinstance(value, dict):
        table = {}
        for layer, ids in value.items():
            if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < layers:
                raise ConfigError(f"{where}: layer {layer!r} out of range (the model has {layers} layers)")
            table[layer] = _ids(f"{where}[{layer}]", ids, experts)
        return table
    ids = _ids(where, value, experts)
    return {layer: ids for layer in range(layers)}


def _ids(where: str, ids: Any, experts: int) -> List[int]:
    if not isinstance(ids, (list, tuple)):
        raise ConfigError(f"{where} must be a list of expert ids, got {ids!r}")
    for e in ids:
        if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < experts:
            raise ConfigError(f"{where}: expert {e!r} out of range (the model has {experts} experts)")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{where}: expert ids repeated in {list(ids)}")
    return sorted(ids)


def check_freeze(spec: Optional[dict], config, where: str = "runner_wrapper.freeze") -> dict:
    """The freeze section, normalised to {"experts": {layer: ids}, "router_rows": {layer: ids},
    "non_moe": bool}; ConfigError naming the YAML path for anything else."""
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping with keys {list(FREEZE_KEYS)}, got {spec!r}")
    unknown = sorted(set(spec) - set(FREEZE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} (known: {list(FREEZE_KEYS)})")
    layers, experts = config.num_hidden_layers, config.num_local_experts
    non_moe = spec.get("non_moe", False)
    if not isinstance(non_moe, bool):
        raise ConfigError(f"{where}.non_moe must be true or false, got {non_moe!r}")
    return {"experts": _per_layer(f"{where}.experts", spec.get("experts", []), layers, experts),
            "router_rows": _per_layer(f"{where}.router_rows", spec.get("router_rows", []), layers, experts),
            "non_moe": non_moe}


def frozen_mask(name: str, shape: Sequence[int], spec: dict) -> Optional[np.ndarray]:
    """bool mask broadcastable to `shape`, True on the frozen elements of parameter `name`, or None."""
    parsed = parse(name)
    if parsed is not None and parsed.kind in _ROWS:
        rows = spec[_ROWS[parsed.kind]].get(parsed.layer, [])
        if not rows:
            return None
        mask = np.zeros((shape[0],) + (1,) * (len(shape) - 1), bool)
        mask[rows] = True
        return mask
    if spec["non_moe"] and not (parsed is not None and parsed.moe):
        return np.ones((1,) * len(shape), bool)
    return None


def trainable_count(params, spec: dict) -> Tuple[int, int]:
    """(all elements, trainable elements) of `params` (Parameters) under the normalised spec."""
    total = trainable = 0
    for p in params:
        n = int(np.prod(p.shape))
        mask = frozen_mask(p.name, p.shape, spec)
        frozen = 0 if mask is None else int(np.broadcast_to(mask, p.shape).sum())
        total, trainable = total + n, trainable + n - frozen
    return total, trainable


class FrozenParameters(nn.Cell):
    """Gradient masks and the masked update for the optimizer's `weights` (a ParameterTuple).

    A parameter frozen whole (non_moe) needs no mask: its gradient is zeroed and its value restored. A
    partly frozen one (chosen experts or router rows) gets a bool mask cloned from it, as the optimizer
    clones its moments: under semi-auto parallel the compiler gives a clone the parameter's own slice
    (model and optimizer shard alike), where a constant would keep the whole shape. The masks cost one
    byte per masked element; checkpoints leave them out (`freeze_mask.*`: the YAML, not a checkpoint, says
    what is frozen)."""

    def __init__(self, weights, config, spec: Optional[dict]) -> None:
        super().__init__(auto_prefix=False)
        spec = check_freeze(spec, config)
        self.weights = weights
        self.frozen, masks = [], []
        for i, param in enumerate(weights):
            mask = frozen_mask(param.name, param.shape, spec)
            if mask is None:
                continue
            if mask.all():
                self.frozen.append((i, -1))
                continue
            clone = param.clone(init=Tensor(np.broadcast_to(mask, param.shape).astype(np.float32), param.dtype))
            clone.name, clone.requires_grad = FREEZE_MASK_PREFIX + param.name, False
            clone.set_dtype(ms.bool_)
            self.frozen.append((i, len(masks)))
            masks.append(clone)
        self.frozen = tuple(self.frozen)
        self.masks = ParameterTuple(masks)

    def mask(self, grads: tuple) -> tuple:
        """Zero the gradients of frozen elements (select, not multiply: an inf there stays out)."""
        if not self.frozen:
            return grads
        grads = list(grads)
        for i, m in self.frozen:
            zeros = ops.zeros_like(grads[i])
            grads[i] = zeros if m < 0 else ops.select(self.masks[m], zeros, grads[i])
        return tuple(grads)

    def update(self, optimizer, grads: tuple):
        """optimizer(grads), then the frozen elements back to their values before the step."""
        if not self.frozen:
            return optimizer(grads)
        before = tuple(self.weights[i] * 1 for i, _ in self.frozen)  # copies, not views of the parameters
        grads = ops.depend(grads, before)
        done = optimizer(grads)
        restored = ()
        for (i, m), old in zip(self.frozen, before):
            new = ops.depend(self.weights[i], done)
            restored += (ops.assign(self.weights[i], old if m < 0 else ops.select(self.masks[m], old, new)),)
        return ops.depend(done, restored)
