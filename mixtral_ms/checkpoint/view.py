"""A checkpoint seen as a Mixtral: for every mixtral-ms parameter of a config, the tensors that hold it,
whichever layout is on disk (mixtral-ms stacked experts, Hugging Face per-expert tensors, a dense Mistral's
MLP as one expert), with the schema's name, shape and dtype checks (name_map.hf_sources, ms_tensors).

Loading (load.py), expert surgery (tools/surgery.py), compression (tools/compress) and the converter's plan
read checkpoints through it, so they agree on which tensor is what. numpy only: a tensor stays a byte range
(safetensors_io.TensorInfo) until it is read; one expert of a stacked tensor is a slice of that range. A
MindSpore .ckpt arrives already read (load.read_ckpt's ArrayTensor), as convert.open_tensors gives it.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from mixtral_ms.checkpoint.name_map import ParamSpec, hf_sources, is_ms_layout, ms_tensors, parameter_specs
from mixtral_ms.checkpoint.safetensors_io import ArrayTensor, TensorInfo, to_numpy
from mixtral_ms.model.schema import ModelDims, hf_dims, moe_layers

Tensor = Union[TensorInfo, ArrayTensor]


class CheckpointView:
    """`tensors` (a checkpoint's, by name) as the parameters of `config` (a config.json dict, a ModelDims or
    a MixtralConfig). `stored[name]`: the tensors as they are on disk: one for a mixtral-ms checkpoint
    (experts stacked), one per expert for Hugging Face experts, none for a dense model's router (zeros).
    `implied_by` names the config in a mixtral-ms checkpoint's shape errors. `dims`: the config's ModelDims."""

    def __init__(self, tensors: Mapping[str, Tensor], config, implied_by: str = "config.json") -> None:
        self.dims: ModelDims = hf_dims(config) if isinstance(config, dict) else config
        self.specs: Dict[str, ParamSpec] = parameter_specs(config)
        self.layout = "ms" if is_ms_layout(tensors) else "hf"
        if self.layout == "ms":
            self.stored: Dict[str, List[Tensor]] = {
                name: [info] for name, info in ms_tensors(tensors, config, implied_by).items()}
        else:
            self.stored = hf_sources(tensors, config)

    @property
    def num_layers(self) -> int:
        return self.dims.num_hidden_layers

    @property
    def num_experts(self) -> int:
        return self.dims.num_local_experts

    @property
    def moe_layers(self) -> Tuple[int, ...]:
        """The layers with a router and experts (the layer pattern's)."""
        return moe_layers(self.dims)

    def parts(self, name: str) -> List[Tensor]:
        """One tensor per expert for stacked experts, whatever the layout on disk; else `stored[name]`."""
        if self.layout == "ms" and self.specs[name].stacked:
            return [self.expert(name, e) for e in range(self.specs[name].shape[0])]
        return self.stored[name]

    def expert(self, name: str, e: int) -> Tensor:
        """Expert `e` of a stacked parameter: its own tensor, or its rows' byte range of the stack."""
        stored = self.stored[name]
        return stored[0].part(e, self.specs[name].shape[0]) if self.layout == "ms" else stored[e]

    def tensor(self, name: str) -> Tensor:
        """A parameter that is one tensor on disk (anything but Hugging Face experts)."""
        return self.stored[name][0]

    def array(self, name: str, expert: Optional[int] = None) -> np.ndarray:
        """A parameter's values as float32 (stacked experts stacked again), or those of one of its experts."""
        if expert is not None:
            return to_numpy(self.expert(name, expert)).astype(np.float32)
        parts = [to_numpy(info).astype(np.float32) for info in self.parts(name)]
        return np.stack(parts) if self.specs[name].stacked else parts[0]
