"""mixtral_ms/run/run_yaml.py: the one reader of run YAMLs and the `--set` writer.

read_run_yaml gives what MindFormers' own reader (`MindFormerConfig._file2dict`) gives, on every shipped YAML
and on base_config chains (a list of bases, bases of bases in other folders); what it cannot read is one
RunError line naming the file (and the line of a YAML syntax error, the missing base). apply_settings sets
dotted keys, creating sections, and refuses to descend into a value that is not a section."""
import glob
import os

import pytest
import yaml

from conftest import ROOT
from mixtral_ms.cli import BadInput
from mixtral_ms.run import RunError
from mixtral_ms.run.run_yaml import apply_settings, read_run_yaml

SHIPPED = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


@pytest.fixture(scope="module")
def file2dict():
    """MindFormers' reader (importing MindFormers takes seconds: only the tests that compare pay it)."""
    from mindformers import MindFormerConfig
    return MindFormerConfig._file2dict


def _write(folder, name, text):
    path = os.path.join(folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _refusal(path) -> str:
    with pytest.raises(RunError) as err:
        read_run_yaml(str(path))
    assert isinstance(err.value, BadInput) and "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "configs")))
def test_every_shipped_yaml_reads_as_mindformers_reads_it(path, file2dict):
    ours = read_run_yaml(path)
    assert ours == file2dict(path) and "base_config" not in ours


def test_shipped_yamls_with_and_without_a_base():
    """The comparison above covers both kinds, and inheritance brings every section and field the file does not
    write itself from its base, unchanged."""
    with_base = [p for p in SHIPPED if "base_config" in yaml.safe_load(open(p, encoding="utf-8"))]
    assert 0 < len(with_base) < len(SHIPPED)
    dense_path = os.path.join(ROOT, "configs", "compress", "dense_tiny_cpu.yaml")
    own = yaml.safe_load(open(dense_path, encoding="utf-8"))
    dense, tiny = read_run_yaml(dense_path), read_run_yaml(os.path.join(ROOT, "configs", "mixtral_tiny_cpu.yaml"))
    assert {k: v for k, v in dense.items() if k not in own} == {k: v for k, v in tiny.items() if k not in own}
    assert {k: v for k, v in dense["model"]["model_config"].items() if k not in own["model"]["model_config"]} == \
        {k: v for k, v in tiny["model"]["model_config"].items() if k not in own["model"]["model_config"]}
    assert {k: dense["model"]["model_config"][k] for k in own["model"]["model_config"]} == own["model"]["model_config"]


def test_a_child_overrides_its_bases_key_by_key(tmp_path, file2dict):
    _write(tmp_path, "base.yaml", "seed: 1\nrun_mode: train\nmodel:\n"
                                  "  model_config: {hidden_size: 8, num_hidden_layers: 2, extra: {a: 1, b: 2}}\n"
                                  "  arch: {type: MixtralForCausalLM}\n"
                                  "callbacks: [{type: A}, {type: B}]\nlr_schedule: {type: X, warmup_ratio: 0.1}\n"
                                  "tokenizer: null\n")
    child = _write(tmp_path, "child.yaml", "base_config: base.yaml\nseed: 2\n"
                                           "model:\n  model_config: {hidden_size: 16, extra: {b: 3, c: 4}}\n"
                                           "callbacks: [{type: C}]\nlr_schedule: 5\ntokenizer: {path: t.model}\n"
                                           "new: x\n")
    expected = {"seed": 2, "run_mode": "train",
                "model": {"model_config": {"hidden_size": 16, "num_hidden_layers": 2,
                                           "extra": {"a": 1, "b": 3, "c": 4}},
                          "arch": {"type": "MixtralForCausalLM"}},
                "callbacks": [{"type": "C"}],  # lists are replaced, not merged
                "lr_schedule": 5, "tokenizer": {"path": "t.model"}, "new": "x"}
    assert read_run_yaml(child) == expected == file2dict(child)
    assert read_run_yaml(os.path.join(tmp_path, "base.yaml"))["model"]["model_config"]["hidden_size"] == 8


def test_a_list_of_bases_and_bases_of_bases_in_other_folders(tmp_path, file2dict):
    # The later base of a list replaces the earlier's top-level sections whole (MindFormers' dict.update);
    # the file itself merges over them key by key. Each file's bases are relative to its own folder.
    _write(tmp_path, "common/root.yaml", "seed: 0\nsection: {a: 1, b: 1}\nonly_root: r\n")
    _write(tmp_path, "common/first.yaml", "base_config: root.yaml\nsection: {b: 2, c: 2}\nfirst: f\n")
    _write(tmp_path, "other/second.yaml", "base_config: [../common/root.yaml]\nsection: {d: 3}\nseed: 5\n")
    child = _write(tmp_path, "runs/child.yaml", "base_config: [../common/first.yaml, ../other/second.yaml]\n"
                                                "section: {e: 4}\n")
    expected = {"seed": 5, "only_root": "r", "first": "f", "section": {"a": 1, "b": 1, "d": 3, "e": 4}}
    assert read_run_yaml(child) == expected == file2dict(child)
    assert read_run_yaml(os.path.join(tmp_path, "common/first.yaml")) == \
        {"seed": 0, "only_root": "r", "first": "f", "section": {"a": 1, "b": 2, "c": 2}}
    empty_list = _write(tmp_path, "runs/alone.yaml", "base_config: []\nseed: 9\n")
    assert read_run_yaml(empty_list) == {"seed": 9} == file2dict(empty_list)


def test_a_missing_base_names_the_file_that_names_it(tmp_path):
    child = _write(tmp_path, "child.yaml", "base_config: nope.yaml\nseed: 1\n")
    assert _refusal(child) == f"{child}: base_config nope.yaml not found (looked for {tmp_path / 'nope.yaml'})"
    middle = _write(tmp_path, "sub/middle.yaml", "base_config: ../gone/base.yaml\n")
    top = _write(tmp_path, "top.yaml", "base_config: [sub/middle.yaml]\n")
    looked = tmp_path / "sub" / "../gone/base.yaml"
    assert _refusal(top) == f"{middle}: base_config ../gone/base.yaml not found (looked for {looked})"
    folder_base = _write(tmp_path, "folder.yaml", "base_config: sub\n")
    assert _refusal(folder_base) == f"{folder_base}: base_config sub not found (looked for {tmp_path / 'sub'})"
    assert _refusal(tmp_path / "absent.yaml") == f"no config file {tmp_path / 'absent.yaml'}"
    assert _refusal(tmp_path / "sub") == f"no config file {tmp_path / 'sub'}"


@pytest.mark.parametrize("data, message", [
    (b"seed: 1\nrun_mode: train\n  output_dir: x\n", "{p}: malformed YAML at line 3"),
    (b"seed: 1\ncallbacks: [{type: A}\nmodel: {}\n", "{p}: malformed YAML at line 3"),
    (b"context:\n\tmode: 0\n", "{p}: malformed YAML at line 2"),
    (b"seed: 1\nrun_mode: \x07\n", "{p}: malformed YAML"),  # a control character: the reader gives no line
    (b"seed: 1\noutput_dir: caf\xe9\n", "{p}: not UTF-8 text (byte 23)"),
    (b"\xff\xfeseed: 1\n", "{p}: not UTF-8 text (byte 0)"),
    (b"- seed\n- run_mode\n", "{p}: the YAML must be a mapping of sections"),
    (b"42\n", "{p}: the YAML must be a mapping of sections"),
    (b"", "{p}: the YAML must be a mapping of sections"),
    (b"# nothing but a comment\n", "{p}: the YAML must be a mapping of sections"),
], ids=["indent", "unclosed", "tab", "control", "latin1", "utf16", "list", "scalar", "empty", "comment"])
def test_unreadable_files_are_one_line(tmp_path, data, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(data)
    assert _refusal(path) == message.format(p=path)
    child = _write(tmp_path, "child.yaml", "base_config: bad.yaml\nseed: 2\n")  # a bad base is named, not the child
    assert _refusal(child) == message.format(p=os.path.join(tmp_path, "bad.yaml"))


def test_utf8_text_and_a_byte_order_mark_are_read(tmp_path, file2dict):
    path = tmp_path / "utf8.yaml"
    path.write_bytes("\ufeffoutput_dir: café\nseed: 3\n".encode("utf-8"))
    assert read_run_yaml(str(path)) == {"output_dir": "café", "seed": 3} == file2dict(str(path))


# ------------------------------------------------------------------------------------------ apply_settings

def test_apply_settings_sets_dotted_keys_and_creates_sections():
    raw = {"seed": 0, "runner_config": {"epochs": 2, "batch_size": 8}, "tokenizer": None}
    apply_settings(raw, {"seed": 1, "runner_config.epochs": 5, "parallel_config.data_parallel": 2,
                         "tokenizer.path": "t.model", "model.model_config.hidden_size": 64,
                         "callbacks": [{"type": "A"}]})
    assert raw == {"seed": 1, "runner_config": {"epochs": 5, "batch_size": 8}, "tokenizer": {"path": "t.model"},
                   "parallel_config": {"data_parallel": 2}, "model": {"model_config": {"hidden_size": 64}},
                   "callbacks": [{"type": "A"}]}
    apply_settings(raw, {})
    assert raw["runner_config"] == {"epochs": 5, "batch_size": 8}


def test_apply_settings_on_a_read_yaml():
    raw = read_run_yaml(os.path.join(ROOT, "configs", "compress", "dense_tiny_cpu.yaml"))
    before = read_run_yaml(os.path.join(ROOT, "configs", "compress", "dense_tiny_cpu.yaml"))
    apply_settings(raw, {"runner_config.epochs": 1, "optimizer.betas": [0.8, 0.9]})
    assert raw["runner_config"] == {**before["runner_config"], "epochs": 1}
    assert raw["optimizer"] == {**before["optimizer"], "betas": [0.8, 0.9]}
    assert {k: v for k, v in raw.items() if k not in ("runner_config", "optimizer")} == \
        {k: v for k, v in before.items() if k not in ("runner_config", "optimizer")}


@pytest.mark.parametrize("dotted, message", [
    ("runner_config.epochs.value", "--set runner_config.epochs.value: runner_config.epochs is not a section"),
    ("seed.x", "--set seed.x: seed is not a section"),
    ("callbacks.0.type", "--set callbacks.0.type: callbacks is not a section"),
    ("model.arch.type.name", "--set model.arch.type.name: model.arch.type is not a section"),
])
def test_apply_settings_refuses_to_descend_into_a_value(dotted, message):
    raw = {"seed": 0, "runner_config": {"epochs": 2}, "callbacks": [{"type": "A"}],
           "model": {"arch": {"type": "MixtralForCausalLM"}}}
    with pytest.raises(RunError) as err:
        apply_settings(raw, {dotted: 1})
    assert str(err.value) == message
    assert raw == {"seed": 0, "runner_config": {"epochs": 2}, "callbacks": [{"type": "A"}],
                   "model": {"arch": {"type": "MixtralForCausalLM"}}}
