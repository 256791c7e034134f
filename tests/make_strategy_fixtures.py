"""Regenerate the strategy files of tests/fixtures/strategies/ (what tests/test_dist_checkpoint.py reads).

Each is written by MindSpore's own semi-auto-parallel compiler in the project's dry run (one compile per
pipeline stage, ~30-60 s each on CPU; a strategy file covers every rank of its stage), for the tiny8 golden
fixture's shapes (tests/fixtures/tiny8/config.json) on layouts of configs/parallel/dryrun/mixtral_tiny_8p.yaml:

    python tests/make_strategy_fixtures.py            # all layouts
    python tests/make_strategy_fixtures.py dp2-mp2-ep2-pp2

which runs, per layout, the equivalent of
    python scripts/dryrun.py --config configs/parallel/dryrun/mixtral_tiny_8p.yaml --all-stages \
        --set model.model_config.vocab_size=128 --set model.model_config.hidden_size=64 ... --output <tmp>
and copies each stage's `ckpt_strategy_rank_<r>.ckpt` to tests/fixtures/strategies/<layout>/; and the shipped
16-device fine-tuning layout (SHIPPED below, ~2 min a stage).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "fixtures", "strategies")
CONFIG = os.path.join(ROOT, "configs", "parallel", "dryrun", "mixtral_tiny_8p.yaml")

# tiny8's shapes (tests/make_hf_fixtures.py FIXTURES["tiny8"]); seq_length stays the YAML's 64
TINY8 = {"model.model_config.vocab_size": 128, "model.model_config.hidden_size": 64,
         "model.model_config.intermediate_size": 96, "model.model_config.num_attention_heads": 8,
         "model.model_config.num_key_value_heads": 2, "model.model_config.max_position_embeddings": 128,
         "model.model_config.num_local_experts": 8}
LAYOUTS = {
    # the YAML's own layout: 8 devices, one stage, optimizer sharding over the replicas
    "dp4-mp2-ep2": {},
    # 8 devices in two pipeline stages (one layer each)
    "dp2-mp2-ep2-pp2": {"parallel_config.data_parallel": 2, "parallel_config.pipeline_stage": 2,
                        "parallel_config.micro_batch_num": 2},
    # 4 devices: a resume on fewer devices
    "dp2-mp2-ep2": {"parallel_config.data_parallel": 2},
    # another model: one layer instead of two (bad-input tests)
    "dp4-mp2-ep2-1layer": {"model.model_config.num_hidden_layers": 1},
}
# A shipped layout, 16 devices dp8 ep8 pp2 with every large weight optimizer-sharded over 8, compiled at a
# width where the 64 KB optimizer-shard threshold acts as on the 8x7B (2 layers, hidden 2048, FFN 7168);
# its layouts slice tiny8's shapes too. bench/dist_load_memory.py measures host memory with it.
SHIPPED = {"mixtral_8x7b_finetune_16p": (
    os.path.join(ROOT, "configs", "parallel", "mixtral_8x7b_finetune_16p.yaml"),
    {"model.model_config.num_hidden_layers": 2, "model.model_config.hidden_size": 2048,
     "model.model_config.intermediate_size": 7168, "model.model_config.num_attention_heads": 16,
     "model.model_config.seq_length": 1024, "parallel_config.micro_batch_num": 2})}


def main(names) -> int:
    from mixtral_ms.tools.dryrun import dry_run
    for name in names or [*LAYOUTS, *SHIPPED]:
        config, settings = SHIPPED[name] if name in SHIPPED else (CONFIG, {**TINY8, **LAYOUTS[name]})
        with tempfile.TemporaryDirectory(prefix="strategies-") as tmp:
            results = dry_run(config, settings, None, True, None, tmp, emit=print)
            bad = [r for r in results if r.problems()]
            if bad:
                print(f"{name}: {bad[0].problems()[0]}", file=sys.stderr)
                return 1
            folder = os.path.join(OUT, name)
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            for result in results:
                shutil.copyfile(result.strategy_file, os.path.join(folder, os.path.basename(result.strategy_file)))
            print(f"{name}: {sorted(os.listdir(folder))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
