#!/usr/bin/env bash
# Installs the whole real stack for the conformance tier, the three venvs in parallel (each is mostly downloads):
# NeMo Gym 0.2.0 and 0.4.0 (Python 3.12) and vLLM (Python 3.11). Fails if any install fails, naming it.
set -uo pipefail
here=$(dirname "$0")
logs=${GYMNB_CACHE:-$HOME/.cache/gymnb}/realstack/install-logs
mkdir -p "$logs"
declare -A what log
start() {  # start NAME LOGFILE COMMAND...
    local name=$1 file=$2; shift 2
    "$@" > "$file" 2>&1 &
    what[$!]=$name; log[$!]=$file
}
for version in 0.2.0 0.4.0; do
    start "NeMo Gym $version (scripts/realstack/install_nemo_gym.sh $version)" "$logs/nemo-gym-$version.log" \
        "$here/install_nemo_gym.sh" "$version"
done
start "vLLM (scripts/realstack/install_vllm.sh)" "$logs/vllm.log" "$here/install_vllm.sh"
failed=0
for pid in "${!what[@]}"; do
    if ! wait "$pid"; then
        echo "error: installing ${what[$pid]} failed; the end of ${log[$pid]}:" >&2
        grep -v "is ignored" "${log[$pid]}" | tail -n 15 >&2
        failed=1
    fi
done
exit $failed
