"""Error types, named for the stage where a failure happened.

Each message says what went wrong and, for setup problems, what to do about it. `assert` is reserved for
internal invariants; user input is checked and reported through these types.
"""


class GymnbError(Exception):
    """Base class: catch this to handle any gymnb failure."""


class ConfigError(GymnbError):
    """A configuration file or override is invalid (unknown key, bad value, unresolved reference)."""


class ModelLoadError(GymnbError):
    """A model or tokenizer could not be found or loaded."""


class ServerError(GymnbError):
    """The policy server failed, or answered something that breaks the protocol."""


class RequestError(GymnbError):
    """A client sent a request the policy server must refuse (mapped to an HTTP 4xx).

    `param` names the offending field, as OpenAI's error bodies do; `status` is the HTTP status to answer.
    """

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.code = code
        self.status = status


class EnvironmentServerError(GymnbError):
    """A NeMo Gym environment (resources server, agent, model server, head server) failed."""


class ContinuityError(GymnbError):
    """Token ids do not line up across the model calls of a rollout (the integration is off-policy)."""


class TrainingError(GymnbError):
    """The training loop hit a state it cannot continue from."""
