#!/usr/bin/env bash
# Launch scripts/run_mixtral.py on one or more nodes with MindSpore's msrun.
#
#   single node, 8 devices:
#     bash scripts/msrun_launcher.sh --device ascend --worker_num 8 \
#         --config configs/parallel/mixtral_8x7b_pretrain_8p.yaml --run_mode train
#   4 nodes x 8 devices, run once per node with its --node_rank (0 is the master):
#     bash scripts/msrun_launcher.sh --device ascend --worker_num 32 --local_worker_num 8 --node_rank 0 \
#         --master_addr 10.0.0.1 --master_port 8118 --log_dir output/msrun_32p \
#         --config configs/parallel/mixtral_8x7b_pretrain_32p.yaml --run_mode train
#   anything after `--` goes to run_mixtral.py unchanged (e.g. -- --predict_data "Hello").
#
# Options (defaults in brackets):
#   --config FILE            run YAML (required)
#   --run_mode MODE          train | finetune | predict [from the YAML]
#   --load_checkpoint PATH   passed to run_mixtral.py
#   --device ascend|gpu|cpu  exported as DEVICE_TARGET (MindFormers reads it when the YAML's context has
#                            no device_target) [ascend]
#   --worker_num N           processes in the whole job [8]
#   --local_worker_num N     processes on this node [worker_num]
#   --node_rank R            this node's rank; required when local_worker_num < worker_num [0]
#   --master_addr ADDR       IP of node 0 [127.0.0.1]
#   --master_port PORT       scheduler port on node 0 [8118]
#   --log_dir DIR            worker logs, worker_<rank>.log [output/msrun_log]
#   --join True|False        wait for the workers and report their status [True]
#   --cluster_time_out S     seconds to wait for all nodes [600]
#   --venv DIR               python environment whose bin/ goes first on PATH (msrun starts plain `python`)
#                            [$MIXTRAL_MS_VENV, else the interpreter that runs `python3` now]
#   --dry_run                print the msrun command and exit
# The exact msrun command is printed before it runs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="" RUN_MODE="" LOAD_CKPT="" DEVICE="ascend"
WORKER_NUM=8 LOCAL_WORKER_NUM="" NODE_RANK="" MASTER_ADDR="127.0.0.1" MASTER_PORT=8118
LOG_DIR="output/msrun_log" JOIN="True" TIME_OUT=600 VENV="${MIXTRAL_MS_VENV:-}" DRY_RUN=0
EXTRA=()

die() { echo "error: msrun_launcher: $*" >&2; exit 2; }
# Options that take a value, and the variable each sets.
declare -A VAR_OF=([--config]=CONFIG [--run_mode]=RUN_MODE [--load_checkpoint]=LOAD_CKPT [--device]=DEVICE
                   [--worker_num]=WORKER_NUM [--local_worker_num]=LOCAL_WORKER_NUM [--node_rank]=NODE_RANK
                   [--master_addr]=MASTER_ADDR [--master_port]=MASTER_PORT [--log_dir]=LOG_DIR [--join]=JOIN
                   [--cluster_time_out]=TIME_OUT [--venv]=VENV)

while [ $# -gt 0 ]; do
  if [ -n "${VAR_OF[$1]:-}" ]; then
    [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"
    printf -v "${VAR_OF[$1]}" '%s' "$2"
    shift 2
    continue
  fi
  case "$1" in
    --dry_run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[ -n "$CONFIG" ] || die "--config is required"
[ -f "$CONFIG" ] || die "no config file $CONFIG"
case "$DEVICE" in
  ascend|Ascend) DEVICE_TARGET=Ascend ;;
  gpu|GPU) DEVICE_TARGET=GPU ;;
  cpu|CPU) DEVICE_TARGET=CPU ;;
  *) die "--device must be ascend, gpu or cpu, got $DEVICE" ;;
esac
if [ -n "$RUN_MODE" ]; then
  case "$RUN_MODE" in train|finetune|predict) ;; *) die "--run_mode must be train, finetune or predict" ;; esac
fi
isint() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got $2"; }
isint --worker_num "$WORKER_NUM"
LOCAL_WORKER_NUM="${LOCAL_WORKER_NUM:-$WORKER_NUM}"
isint --local_worker_num "$LOCAL_WORKER_NUM"
isint --master_port "$MASTER_PORT"
[ "$MASTER_PORT" -ge 1 ] && [ "$MASTER_PORT" -le 65535 ] || die "--master_port must be in 1..65535, got $MASTER_PORT"
case "$JOIN" in
  True|true) JOIN=True ;;
  False|false) JOIN=False ;;
  *) die "--join must be True or False, got $JOIN" ;;
esac
[[ "$TIME_OUT" =~ ^[0-9]+$ ]] && [ "$TIME_OUT" -ge 1 ] || die "--cluster_time_out must be a positive number of seconds, got $TIME_OUT"
[ "$WORKER_NUM" -ge 1 ] || die "--worker_num must be at least 1"
[ "$LOCAL_WORKER_NUM" -ge 1 ] && [ "$LOCAL_WORKER_NUM" -le "$WORKER_NUM" ] || \
  die "--local_worker_num must be in 1..worker_num ($WORKER_NUM)"
if [ "$LOCAL_WORKER_NUM" -lt "$WORKER_NUM" ]; then
  [ -n "$NODE_RANK" ] || die "multi-node job (local_worker_num < worker_num): give --node_rank"
  [ $((WORKER_NUM % LOCAL_WORKER_NUM)) -eq 0 ] || die "worker_num must be a multiple of local_worker_num"
  [ "$MASTER_ADDR" != "127.0.0.1" ] || echo "msrun_launcher: warning: multi-node job with --master_addr 127.0.0.1" >&2
fi
if [ -n "$NODE_RANK" ]; then
  isint --node_rank "$NODE_RANK"
  NODES=$((WORKER_NUM / LOCAL_WORKER_NUM))
  [ "$NODE_RANK" -lt "$NODES" ] || die "--node_rank must be below the node count $NODES"
fi

# The venv's python first on PATH: msrun spawns plain `python` for every worker.
if [ -z "$VENV" ]; then
  VENV="$(python3 -c 'import sys; print(sys.prefix)')"
fi
[ -x "$VENV/bin/python" ] || die "no python in $VENV/bin (give --venv or set MIXTRAL_MS_VENV)"
[ -x "$VENV/bin/msrun" ] || command -v msrun >/dev/null || die "msrun not found in $VENV/bin or on PATH"
# The YAML's layout must be the job's size (dp x mp x pp processes; one without use_parallel): checked here,
# not after msrun has started every worker (mixtral_ms/run/checks.py check_worker_num).
if ! layout_error=$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m mixtral_ms.run.checks \
                    "$CONFIG" "$WORKER_NUM" 2>&1); then
  case "$layout_error" in
    error:*) die "${layout_error#error: }" ;;
    *) echo "$layout_error" >&2; exit 1 ;;  # a bug, not the input: its traceback
  esac
fi
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export DEVICE_TARGET
export GLOG_v="${GLOG_v:-2}"
if grep -qE '^\s*type:\s*OffloadAdamW' "$CONFIG" || grep -qE '^\s*swap:\s*True' "$CONFIG"; then
  # host-resident optimizer states need the runtime's switch inlining off (as MindFormers' AdamW swap)
  export MS_DEV_RUNTIME_CONF="${MS_DEV_RUNTIME_CONF:+$MS_DEV_RUNTIME_CONF,}switch_inline:False"
fi
if [ "$DEVICE_TARGET" = "Ascend" ]; then
  export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1800}"
  export MS_ALLOC_CONF="${MS_ALLOC_CONF:-enable_vmm:True}"
fi

CMD=(msrun --worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER_NUM" --master_addr="$MASTER_ADDR"
     --master_port="$MASTER_PORT" --log_dir="$LOG_DIR" --join="$JOIN" --cluster_time_out="$TIME_OUT")
[ -z "$NODE_RANK" ] || CMD+=(--node_rank="$NODE_RANK")
CMD+=("$ROOT/scripts/run_mixtral.py" --config "$CONFIG")
[ -z "$RUN_MODE" ] || CMD+=(--run_mode "$RUN_MODE")
[ -z "$LOAD_CKPT" ] || CMD+=(--load_checkpoint "$LOAD_CKPT")
CMD+=("${EXTRA[@]}")

echo "DEVICE_TARGET=$DEVICE_TARGET PATH=$VENV/bin:\$PATH PYTHONPATH=$PYTHONPATH${MS_DEV_RUNTIME_CONF:+ MS_DEV_RUNTIME_CONF=$MS_DEV_RUNTIME_CONF}"
printf '%q ' "${CMD[@]}"; echo
[ "$DRY_RUN" -eq 0 ] || exit 0
mkdir -p "$LOG_DIR"
exec "${CMD[@]}"
