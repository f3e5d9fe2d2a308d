"""Head server: where NeMo Gym clients (and gymnb's collector) find every server of a running stack.

    GET /global_config_dict_yaml   the resolved global config as YAML text, JSON-encoded (a JSON string), as
                                   NeMo Gym serves it; clients do `OmegaConf.create(json.loads(body))`
    GET /server_instances          [{"process_name": "math_with_judge", "server_type": "resources_servers",
                                     "name": "math_with_judge", "host": "127.0.0.1", "port": 40123,
                                     "url": "http://127.0.0.1:40123", "pid": ..., "start_time": ..., ...}]
    GET /                          {"status": "ok"}

The config served carries each instance's real host and port (free ports are filled in once bound) and
`head_server: {host, port}`, so `get_first_server_config_dict(config, name)` style lookups work unchanged.
Credentials (`policy_api_key`, every `api_key`) are served as null: anyone who reaches the port can read it.
"""

from __future__ import annotations

import json

from aiohttp import web

from gymnb.gym.common import make_server_app
from gymnb.gym.config import dump_yaml

STATE_KEY = web.AppKey("gymnb_head_state", dict)
# Config keys whose values are credentials: the head answers anyone who can reach it, so it serves them as
# null. Clients that need the policy's key get it from their own configuration (--api-key-file, $GYMNB_API_KEY).
SECRET_KEYS = frozenset({"policy_api_key", "api_key"})


def redact_secrets(value):
    """A copy of a config with every SECRET_KEYS value set to None."""
    if isinstance(value, dict):
        return {k: None if k in SECRET_KEYS else redact_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    return value


def make_app(config: dict, server_instances: list[dict]) -> web.Application:
    """Serve `config` and `server_instances`; both may be updated in place until the stack is up."""
    app = make_server_app("head_server", sessions=False)
    app[STATE_KEY] = {"config": config, "server_instances": server_instances}

    async def global_config_dict_yaml(request: web.Request) -> web.Response:
        text = dump_yaml(redact_secrets(request.app[STATE_KEY]["config"]))
        return web.Response(text=json.dumps(text), content_type="application/json")

    async def get_server_instances(request: web.Request) -> web.Response:
        return web.json_response(request.app[STATE_KEY]["server_instances"])

    app.router.add_get("/global_config_dict_yaml", global_config_dict_yaml)
    app.router.add_get("/server_instances", get_server_instances)
    return app
