# Source me: creates (once) and activates the project venv, kept outside the clone and keyed by
# the hash of requirements.txt, so CI and later runs reuse it while the pins are unchanged.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_hash="$(sha256sum "$_root/requirements.txt" | cut -c1-12)"
MIXTRAL_MS_VENV="${MIXTRAL_MS_VENV:-$HOME/.cache/mixtral-ms/venv-$_hash}"
if [ ! -f "$MIXTRAL_MS_VENV/.complete" ]; then
  echo "setting up $MIXTRAL_MS_VENV (mindspore + mindformers, ~3.5 GB, a few minutes)" >&2
  rm -rf "$MIXTRAL_MS_VENV"
  python3.11 -m venv "$MIXTRAL_MS_VENV" || python3 -m venv "$MIXTRAL_MS_VENV"
  "$MIXTRAL_MS_VENV/bin/pip" install -q --disable-pip-version-check -r "$_root/requirements.txt"
  touch "$MIXTRAL_MS_VENV/.complete"
fi
if [ ! -x "$MIXTRAL_MS_VENV/bin/mixtral-ms-run" ]; then  # the package and its console scripts (pyproject.toml)
  "$MIXTRAL_MS_VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$_root"
fi
export PATH="$MIXTRAL_MS_VENV/bin:$PATH"  # msrun starts plain `python`
# The venv is shared by every checkout with these pins; this checkout's package comes first on the path.
export PYTHONPATH="$_root${PYTHONPATH:+:$PYTHONPATH}"
export GLOG_v="${GLOG_v:-3}"  # MindSpore's C++ warnings off unless asked for
unset _root _hash
