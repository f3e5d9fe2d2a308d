#!/usr/bin/env bash
# Installs real NeMo Gym (the registry package `nemo-gym`) into its own Python 3.12 venv, for the conformance
# tier. NeMo Gym needs Python >= 3.12; gymnb itself stays on 3.11 (its CPU torch build is for 3.11).
#   scripts/realstack/install_nemo_gym.sh 0.4.0      -> $GYMNB_CACHE/realstack/nemo-gym-0.4.0/
set -euo pipefail
version=${1:?usage: install_nemo_gym.sh VERSION (e.g. 0.2.0 or 0.4.0)}
root=${GYMNB_CACHE:-$HOME/.cache/gymnb}/realstack
venv=$root/nemo-gym-$version
[ -f "$venv/.installed" ] && { echo "$venv"; exit 0; }

find_python312() {
    local candidate
    for candidate in "${GYMNB_PYTHON312:-}" python3.12 "$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12" \
        /usr/bin/python3.12; do
        [ -n "$candidate" ] || continue
        if PYENV_VERSION=3.12.1 "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            echo "$candidate"; return 0
        fi
    done
    return 1
}
py=$(find_python312) || {
    echo "error: real NeMo Gym needs Python 3.12 and none was found." >&2
    echo "  fix: install one (pyenv install 3.12, or apt-get install python3.12-venv) or set GYMNB_PYTHON312=/path/to/python3.12" >&2
    exit 2
}
mkdir -p "$root"
rm -rf "$venv"
PYENV_VERSION=3.12.1 "$py" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# ng_run makes a uv venv per server folder unless told to skip it; uv must be importable either way.
"$venv/bin/pip" install -q "nemo-gym==$version" uv
# The 0.2.0 wheel imports `scripts.update_resource_servers` (a repository script, used only when naming
# datasets uploaded to the HF hub) without shipping it, so its `ng_run` dies on import. A stub module on
# PYTHONPATH (gymnb.realstack sets it for every NeMo Gym process) lets the CLI start; the stub raises if called.
if ! "$venv/bin/python" -c 'import nemo_gym.hf_utils' 2>/dev/null; then
    mkdir -p "$venv/gymnb-shims/scripts"
    : > "$venv/gymnb-shims/scripts/__init__.py"
    cat > "$venv/gymnb-shims/scripts/update_resource_servers.py" <<'PY'
def visit_resources_server(*args, **kwargs):
    raise NotImplementedError("scripts.update_resource_servers is not shipped in this nemo-gym wheel")
PY
    PYTHONPATH="$venv/gymnb-shims" "$venv/bin/python" -c 'import nemo_gym.hf_utils'
fi
touch "$venv/.installed"
echo "$venv"
