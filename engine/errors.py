"""Typed errors. Every error that can reach a user names what was wrong."""


class DisaggError(Exception):
    """Base class of every error this project raises on purpose."""


class InvalidRequestError(DisaggError, ValueError):
    """A request or parameter is invalid. `field` names the offending field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class ModelLoadError(DisaggError):
    """A model folder, preset or checkpoint could not be loaded."""


class ConfigError(DisaggError, ValueError):
    """A plan or cluster config is invalid."""


class OverloadedError(DisaggError):
    """The system is full and refuses new work for now (gRPC RESOURCE_EXHAUSTED)."""


class RequestFailedError(DisaggError):
    """A request could not be completed (every retry failed, or no instance can serve it)."""


class TransferError(DisaggError):
    """A KV transfer failed or timed out."""
