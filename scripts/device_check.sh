#!/usr/bin/env bash
# The checks that need an accelerator, in one go on a fresh GPU or Ascend machine (docs/parallel.md,
# "On a GPU or Ascend machine"). One line per check on stdout: `PASS <check>: ...` or `FAIL <check>: <why>`;
# details in <out>/*.log. Exit status: the number of failed checks.
#
#   bash scripts/device_check.sh                      # device from nvidia-smi / npu-smi, every local device
#   bash scripts/device_check.sh --device gpu --devices 2 --steps 6 --out output/device_check
#   bash scripts/device_check.sh --wheels /path/to/wheels   # offline: pip installs from that folder only
#   bash scripts/device_check.sh --device cpu --venv "$MIXTRAL_MS_VENV"  # rehearse the script on a laptop
#
# 1. env:        a venv with requirements.txt (reused when it imports), and for GPU the CUDA 11 runtime wheels
#                MindSpore's GPU plugin links against; a matmul on the device.
# 2. dryrun:     scripts/dryrun.py on the tiny matrix's pp2 and dp4-mp2-ep2 rows (MindSpore's parallel compiler,
#                DryRun level 0; the real CANN where ASCEND_HOME_PATH is set, the stand-in elsewhere).
# 3. tiny-train: scripts/run_mixtral.py train on configs/mixtral_tiny_cpu.yaml with context.device_target
#                set, on a slice of the bundled corpus, a few steps, once plain and once with
#                gradient_accumulation_steps 2 and micro_batch_interleave_num 2; the loss must be finite.
# 4. semi-auto:  configs/parallel/mixtral_8x7b_pretrain_32p.yaml scaled down (tiny model) to the devices
#                present: 1 device dp1; 2: pp2; 4+: dp n/2, ep n/2 (<= 8), pp2, compiled and run for one
#                epoch of the same slice under msrun (scripts/msrun_launcher.sh).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE="" DEVICES="" STEPS=6 OUT="$ROOT/output/device_check" VENV="$ROOT/.venv-device" WHEELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --device|--devices|--steps|--out|--venv|--wheels)
      if [ $# -lt 2 ] || [ -z "$2" ] || [ "${2#--}" != "$2" ]; then echo "error: $1 needs a value" >&2; exit 2; fi ;;
  esac
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --devices) DEVICES="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    *) echo "error: unknown option $1" >&2; exit 2 ;;
  esac
done
for n in "$STEPS" ${DEVICES:+"$DEVICES"}; do
  case "$n" in ''|*[!0-9]*|0) echo "error: --steps and --devices take a positive integer, got '$n'" >&2; exit 2 ;; esac
done
[ -z "$WHEELS" ] || [ -d "$WHEELS" ] || { echo "error: --wheels $WHEELS is not a folder" >&2; exit 2; }
# Every flag is checked before anything is created or installed (exit 2, one line).
for pair in "--out:$OUT" "--venv:$VENV"; do
  flag="${pair%%:*}" path="${pair#*:}" up="${pair#*:}"
  [ ! -e "$path" ] || [ -d "$path" ] || { echo "error: $flag $path exists and is not a folder" >&2; exit 2; }
  while [ ! -e "$up" ]; do up="$(dirname "$up")"; done
  [ -d "$up" ] && [ -w "$up" ] || { echo "error: $flag $path cannot be created ($up is not a writable folder)" >&2; exit 2; }
done
if [ -z "$DEVICE" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then DEVICE=gpu
  elif command -v npu-smi >/dev/null 2>&1; then DEVICE=ascend
  else echo "FAIL env: no nvidia-smi or npu-smi on this machine (pass --device)"; exit 1; fi
fi
case "$DEVICE" in
  gpu) TARGET=GPU; COUNT=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') ;;
  ascend) TARGET=Ascend; COUNT=$(npu-smi info -l 2>/dev/null | grep -ci 'NPU ID') ;;
  cpu) TARGET=CPU; COUNT=2 ;;  # a rehearsal of the script itself: semi-auto fails, as MindSpore refuses it on CPU
  *) echo "error: --device must be gpu, ascend or cpu" >&2; exit 2 ;;
esac
if [ "$COUNT" -lt 1 ]; then echo "error: --device $DEVICE: no $TARGET device found on this machine" >&2; exit 2; fi
if [ -n "$DEVICES" ] && [ "$DEVICES" -gt "$COUNT" ]; then
  echo "error: --devices $DEVICES exceeds the $COUNT $TARGET device(s) of this machine" >&2; exit 2
fi
DEVICES="${DEVICES:-$COUNT}"
mkdir -p "$OUT" || { echo "error: --out $OUT cannot be created" >&2; exit 2; }
FAILED=0
report() {  # report <check> <status> <message>
  if [ "$2" = 0 ]; then echo "PASS $1: $3"; else echo "FAIL $1: $3"; FAILED=$((FAILED + 1)); fi
}
first_error() { grep -hE "Error|error:" "$@" 2>/dev/null | grep -v "^\s*$" | head -1 | cut -c1-300; }

# ------------------------------------------------------------------------------------------------ 1. env
PIP_ARGS=()
[ -n "$WHEELS" ] && PIP_ARGS=(--no-index --find-links "$WHEELS")
{
  [ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV" || python3 -m venv "$VENV"
  "$VENV/bin/python" -c "import mindspore, mindformers" 2>/dev/null || \
    "$VENV/bin/pip" install "${PIP_ARGS[@]}" -r "$ROOT/requirements.txt"
  if [ "$DEVICE" = gpu ]; then  # MindSpore 2.9's GPU plugin is built against CUDA 11.6 / cuDNN 8
    "$VENV/bin/pip" install "${PIP_ARGS[@]}" nvidia-cuda-runtime-cu11 nvidia-cublas-cu11 nvidia-cudnn-cu11 \
      nvidia-cufft-cu11 nvidia-curand-cu11 nvidia-cusolver-cu11 nvidia-cusparse-cu11 nvidia-nccl-cu11
  fi
} > "$OUT/env.log" 2>&1
if [ "$DEVICE" = gpu ]; then
  NV=$("$VENV/bin/python" -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))" 2>/dev/null)/nvidia
  for lib in "$NV"/*/lib; do export LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"; done
fi
export PATH="$VENV/bin:$PATH" PYTHONPATH="$ROOT:${PYTHONPATH:-}" GLOG_v=3 DEVICE_TARGET="$TARGET"
python - "$TARGET" >> "$OUT/env.log" 2>&1 <<'EOF'
import sys
import numpy as np
import mindspore as ms
ms.set_device(sys.argv[1])
x = ms.Tensor(np.ones((64, 64), np.float32))
y = ms.ops.matmul(x, x).asnumpy()
assert y[0, 0] == 64.0, y[0, 0]
print(f"mindspore {ms.__version__} on {sys.argv[1]}: matmul ok")
EOF
status=$?
report env $status "$( [ $status = 0 ] && tail -1 "$OUT/env.log" || first_error "$OUT/env.log")"
[ $status = 0 ] || { echo "device_check: $FAILED check(s) failed; logs in $OUT"; exit "$FAILED"; }

# ------------------------------------------------------------------------------------------------ 2. dryrun
# The parallel compile of the tiny matrix's pipeline and expert-parallel rows (scripts/dryrun.py): with a CANN
# install (ASCEND_HOME_PATH) against it, else against the stand-in; GPU has no DryRun, so there it checks the
# host-side compile only.
python "$ROOT/scripts/dryrun.py" --matrix --rows dp2-mp2-ep2-pp2-bias-globalaux,dp4-mp2-ep2 --output "$OUT/dryrun" \
  > "$OUT/dryrun.log" 2>&1
status=$?
report dryrun $status "$(grep -E '^dry run:' "$OUT/dryrun.log" || first_error "$OUT/dryrun.log")"

# ----------------------------------------------------------------------------------------- 3. tiny-train
# A slice of the corpus for about --steps steps of 8 rows x 129 tokens (~4.5 characters a token here)
head -c $(( STEPS * 8 * 129 * 9 / 2 )) "$ROOT/data/corpus/kjv_genesis_to_ruth.txt" > "$OUT/corpus_slice.txt"
python "$ROOT/scripts/preprocess_data.py" --input "$OUT/corpus_slice.txt" --format text \
  --seq_length 128 --tokenizer "$ROOT/data/tokenizer/tokenizer.model" --output "$OUT/tiny.mindrecord" \
  --overwrite > "$OUT/preprocess.log" 2>&1
derive() {  # derive <source yaml> <target yaml> <python statements on cfg>
  LOCAL_DEFAULT_PATH="$OUT" python - "$1" "$2" "$3" <<'EOF'
import sys
import yaml
from mixtral_ms.run.run_yaml import read_run_yaml  # the project's one YAML reader: base_config: merged in
cfg = read_run_yaml(sys.argv[1])
exec(sys.argv[3])
yaml.safe_dump(cfg, open(sys.argv[2], "w"))
EOF
}
for variant in plain multi; do
  extra=""
  [ "$variant" = multi ] && extra="cfg['runner_config']['gradient_accumulation_steps'] = 2; cfg['micro_batch_interleave_num'] = 2"
  derive "$ROOT/configs/mixtral_tiny_cpu.yaml" "$OUT/tiny_$variant.yaml" "
cfg['context']['device_target'] = '$TARGET'
cfg['output_dir'] = '$OUT/tiny_$variant'
cfg['train_dataset']['data_loader']['dataset_dir'] = '$OUT/tiny.mindrecord'
cfg['runner_config']['epochs'] = 1
cfg['callbacks'] = [{'type': 'MixtralProgressMonitor', 'log_interval': 1}, {'type': 'RouterStatsMonitor', 'log_interval': 1, 'verbose': False}]
$extra"
  python "$ROOT/scripts/run_mixtral.py" --config "$OUT/tiny_$variant.yaml" --run_mode train > "$OUT/tiny_$variant.log" 2>&1
  status=$?
  losses=$(grep -oE "^step [0-9]+/[0-9]+ \| loss [0-9.naif]+" "$OUT/tiny_$variant.log" | awk '{print $NF}' | tr '\n' ' ')
  if [ $status = 0 ] && [ -n "$losses" ] && ! echo "$losses" | grep -qiE "nan|inf"; then
    report "tiny-train ($variant, $TARGET)" 0 "losses $losses"
  else
    report "tiny-train ($variant, $TARGET)" 1 "exit $status: $(first_error "$OUT/tiny_$variant.log")"
  fi
done

# ------------------------------------------------------------------------------------------ 4. semi-auto
if [ "$DEVICES" -ge 4 ]; then half=$((DEVICES / 2)); ep=$(( half < 8 ? half : 8 )); while [ $((8 % ep)) -ne 0 ] || [ $((half % ep)) -ne 0 ]; do ep=$((ep - 1)); done
  layout="data_parallel=$half, expert_parallel=$ep, pipeline_stage=2, micro_batch_num=2"; DEVICES=$((half * 2))
elif [ "$DEVICES" -ge 2 ]; then layout="data_parallel=1, expert_parallel=1, pipeline_stage=2, micro_batch_num=2"; DEVICES=2
else layout="data_parallel=1, expert_parallel=1, pipeline_stage=1, micro_batch_num=1"; DEVICES=1; fi
derive "$ROOT/configs/parallel/mixtral_8x7b_pretrain_32p.yaml" "$OUT/semi_auto.yaml" "
cfg['parallel_config'].update($layout)
cfg['model']['model_config'].update(vocab_size=2000, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, seq_length=128, max_position_embeddings=512)
cfg['train_dataset']['data_loader']['dataset_dir'] = '$OUT/tiny.mindrecord'
cfg['train_dataset']['num_parallel_workers'] = 1
cfg['train_dataset_task']['dataset_config'] = cfg['train_dataset']
cfg['output_dir'] = '$OUT/semi_auto'
cfg['runner_config']['epochs'] = 1
cfg['runner_config']['sink_mode'] = False
cfg['callbacks'] = [{'type': 'MixtralProgressMonitor', 'log_interval': 1}]"
bash "$ROOT/scripts/msrun_launcher.sh" --device "$DEVICE" --worker_num "$DEVICES" --master_port 8129 \
  --log_dir "$OUT/semi_auto_logs" --venv "$VENV" --config "$OUT/semi_auto.yaml" --run_mode train \
  > "$OUT/semi_auto.log" 2>&1
status=$?
last=$(( DEVICES - 1 ))
steps=$(grep -hoE "^step [0-9]+/[0-9]+ \| loss [0-9.naif]+" "$OUT"/semi_auto_logs/worker_*.log 2>/dev/null | head -2 | tr '\n' ';')
if [ $status = 0 ] && [ -n "$steps" ]; then
  report "semi-auto ($layout, $DEVICES x $TARGET)" 0 "compiled and ran: $steps"
else
  report "semi-auto ($layout, $DEVICES x $TARGET)" 1 \
    "exit $status: $(first_error "$OUT/semi_auto_logs/worker_$last.log" "$OUT/semi_auto_logs/worker_0.log" "$OUT/semi_auto.log")"
fi
echo "device_check: $FAILED check(s) failed; logs in $OUT"
exit "$FAILED"
