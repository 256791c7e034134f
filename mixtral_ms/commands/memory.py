"""Per-device memory of a run YAML under its parallel layout (mixtral_ms/parallel/memory.py has the rules).

    mixtral-ms-memory --config configs/parallel/mixtral_8x7b_pretrain_32p.yaml
    mixtral-ms-memory --config X.yaml --header         # the YAML header block
    mixtral-ms-memory --config X.yaml --write_header   # refresh it in place (temp file + rename)

Bad input prints one line `error: ...` and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from mixtral_ms import cli


def _main(args: argparse.Namespace) -> None:
    from mixtral_ms.parallel.memory import from_run_config_estimate, header_block, report, write_header
    from mixtral_ms.run.run_yaml import read_run_yaml
    path = os.path.relpath(args.config) if os.path.isabs(args.config) else args.config
    est = from_run_config_estimate(read_run_yaml(args.config), args.devices, args.master_weights)
    if args.write_header:
        write_header(args.config, est)
    print(header_block(path, est) if args.header or args.write_header else report(est, path))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML (parallel_config, parallel, model.model_config)")
    parser.add_argument("--devices", type=int, help="device count to validate against (default dp*mp*pp)")
    parser.add_argument("--master_weights", action="store_true",
                        help="count an fp32 master copy for bf16/fp16 parameters (AdamW here keeps none)")
    parser.add_argument("--header", action="store_true", help="print the YAML header comment block")
    parser.add_argument("--write_header", action="store_true", help="write the header block into the YAML")
    return cli.run(_main, parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
