#!/usr/bin/env bash
# Sets up the venv (once) and runs the whole test suite on CPU.
#
# pytest runs single-threaded, so the suite runs as two pytest processes side by side, one per core: the
# model-parity and Trainer modules in one, everything else (with tests/conftest.py's background compile
# matrix and msrun launch) in the other; the first one's report follows the second's. With arguments, one
# pytest over tests/ with them, as before (e.g. bash scripts/test.sh -k capacity).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
if [ $# -gt 0 ]; then
  exec python -m pytest tests -q "$@"
fi
first=(tests/test_training.py tests/test_hf_parity.py tests/test_freeze.py tests/test_distill.py
       tests/test_evaluate.py tests/test_config.py tests/test_data.py)
rest=()
for f in tests/test_*.py; do
  [[ " ${first[*]} " == *" $f "* ]] || rest+=("$f")
done
work="$(mktemp -d "${TMPDIR:-/tmp}/mixtral-ms-suite.XXXXXX")"
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT
python -m pytest -q -p no:cacheprovider --basetemp "$work/a" "${first[@]}" > "$work/first.log" 2>&1 &
pid=$!
status=0
python -m pytest -q -p no:cacheprovider --basetemp "$work/b" "${rest[@]}" || status=$?
first_status=0
wait "$pid" || first_status=$?
pid=""
echo "== ${first[*]}"
cat "$work/first.log"
if [ "$status" -ne 0 ] || [ "$first_status" -ne 0 ]; then
  exit 1
fi
