"""Sliced loading through MindSpore's own parallel compiler, on CPU: one rank of a layout YAML compiled by
the dry run (mixtral_ms/tools/dryrun.py: the real semi-auto compiler, device side mocked) with
runner.build_model given a complete checkpoint, then every weight checked: initialised by the compiler
(its lazy initializer ran, checkpoint/distributed.py SlicedLoad) with exactly the box the strategy file of that
compile gives the rank; the other stages' weights left unread, except those the compiler initialises whole
on every rank (a pipeline's embedding), read whole.

    python bench/sliced_load_compile.py --checkpoint MS_DIR --config configs/parallel/dryrun/mixtral_tiny_8p.yaml \
        --rank 3 [--set key=value ...]

The dry run cannot show the values (the device is mocked); tests/test_dist_checkpoint.py checks the values the
initializer gives. Exit 0 when every weight of the rank's stage was filled with its box.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(spec: dict) -> dict:
    """In the dry-run environment: compile the rank with the checkpoint, report what was filled."""
    from mixtral_ms.checkpoint.load import resolve_checkpoint
    from mixtral_ms.run import runner
    from mixtral_ms.tools import dryrun
    from mixtral_ms.checkpoint.distributed import box_shape, read_strategy
    build, models = runner.build_model, []

    def with_checkpoint(run, _checkpoint):  # the dry run builds without weights; this one loads them
        models.append(build(run, spec["checkpoint"]))
        return models[-1]
    runner.build_model = with_checkpoint
    result = dryrun.worker({"config": spec["config"], "rank": spec["rank"], "settings": spec["settings"],
                            "output_dir": spec["output_dir"], "graphs_dir": os.path.join(spec["output_dir"], "graphs")})
    if not result.compiled:
        return {"compiled": False, "error": result.error}
    strategy = read_strategy(result.strategy_file)
    rank, filled, whole, unread, wrong = spec["rank"], [], [], [], []
    sources = resolve_checkpoint(spec["checkpoint"])
    from mixtral_ms.checkpoint.distributed import open_complete
    weights = set(open_complete(sources, models[0].config))
    for param in models[0].get_parameters():
        if param.name not in weights:
            continue
        full = _full_shape(param.name, models[0])
        if param.name not in strategy.layouts:  # another stage's: unread, or initialised whole by the compiler
            if param.init_mode is not None:
                unread.append(param.name)
            elif tuple(param.shape) == tuple(full):
                whole.append(param.name)
            else:
                wrong.append(f"{param.name}: {list(param.shape)}, not in the stage's strategy")
            continue
        want = box_shape(strategy.box(param.name, full, rank))
        if param.init_mode is None and tuple(param.shape) == want:
            filled.append(param.name)
        else:
            wrong.append(f"{param.name}: {list(param.shape)} (initialised: {param.init_mode is None}), box {list(want)}")
    return {"compiled": True, "strategy": result.strategy_file, "filled": len(filled), "whole": whole,
            "unread": len(unread), "wrong": wrong, "layout": result.layout}


def _full_shape(name, model):
    from mixtral_ms.checkpoint.name_map import parameter_specs
    return parameter_specs(model.config)[name].shape


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    from mixtral_ms.tools.cann_stub import ensure_stub, environment
    from mixtral_ms.tools.dryrun import _parse_set
    from mixtral_ms.run import runner
    settings = _parse_set(args.set)
    devices = runner.load_run(args.config, None, settings).layout.devices
    out = tempfile.mkdtemp(prefix="sliced-load-")
    env = environment(ensure_stub())
    env.update(DEVICE_TARGET="Ascend", MS_SIMULATION_LEVEL="0", RANK_SIZE=str(devices), RANK_ID=str(args.rank),
               GLOG_v="3", LOCAL_DEFAULT_PATH=os.path.join(out, "log"))
    env.pop("MS_ROLE", None)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    spec = {"config": os.path.abspath(args.config), "rank": args.rank, "settings": settings, "output_dir": out,
            "checkpoint": os.path.abspath(args.checkpoint)}
    try:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--checkpoint", args.checkpoint, "--config",
                               args.config, "--child", json.dumps(spec)], env=env, cwd=out, capture_output=True,
                              text=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        print(done.stdout[-2000:] + done.stderr[-2000:], file=sys.stderr)
        return 1
    result = json.loads(lines[-1][len("RESULT "):])
    print(json.dumps(result, indent=1))
    return 0 if result.get("compiled") and not result.get("wrong") and result.get("filled") else 1


if __name__ == "__main__":
    sys.exit(main())
