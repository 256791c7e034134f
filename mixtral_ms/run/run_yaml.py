"""The one reader of run YAMLs: the file with its `base_config:` files merged under it, as MindFormers' reader
(`MindFormerConfig._file2dict`) merges them, as plain data. PyYAML only, since importing MindFormers costs
seconds: bad input is refused in a fraction of a second (tests/test_run_yaml.py keeps the two readers equal
on every shipped YAML). Every tool that takes a run YAML reads it here: the runner, the launcher's check,
the memory estimate, the dry run, expert surgery's `--config`, distillation's `teacher_config`."""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping

from mixtral_ms.run import RunError


def read_run_yaml(path: str) -> Dict[str, Any]:
    """A run YAML and the files it inherits; RunError (one line) for a missing, non-UTF-8, malformed or
    non-mapping file, or a missing base_config."""
    import yaml
    if not os.path.isfile(path):
        raise RunError(f"no config file {path}")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError as err:
        raise RunError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise RunError(f"{path}: malformed YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: the YAML must be a mapping of sections")
    bases = data.pop("base_config", None)
    if bases is None:
        return data
    merged: Dict[str, Any] = {}
    for base in bases if isinstance(bases, list) else [bases]:
        base_path = os.path.join(os.path.dirname(path), str(base))
        if not os.path.isfile(base_path):
            raise RunError(f"{path}: base_config {base} not found (looked for {base_path})")
        merged.update(read_run_yaml(base_path))
    return _merge(data, merged)


def _merge(over: Mapping, under: Mapping) -> Dict[str, Any]:
    """`under` with `over`'s keys set on it, mappings merged key by key."""
    out = dict(under)
    for key, value in over.items():
        out[key] = _merge(value, out[key]) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) \
            else value
    return out


def apply_settings(raw: Dict[str, Any], settings: Mapping[str, Any]) -> None:
    """Set dotted keys (`parallel_config.data_parallel` -> raw["parallel_config"]["data_parallel"]); a missing
    section is created, a non-mapping on the way is refused."""
    for dotted, value in settings.items():
        node, keys = raw, dotted.split(".")
        for i, key in enumerate(keys[:-1]):
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise RunError(f"--set {dotted}: {'.'.join(keys[:i + 1])} is not a section")
        node[keys[-1]] = value
