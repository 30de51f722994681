"""The failure classes Segue tells apart: an event's own fault, or the infrastructure's.

Bad input is dead-lettered with its reason (``segue.schemas.events.InvalidEvent``); an
:class:`InfrastructureError` (a model that cannot load, a stopped engine) is retried
and reported, never dead-lettered, as are transient database errors
(:func:`segue.isolation.is_transient`).
"""

from __future__ import annotations


class InfrastructureError(RuntimeError):
    """A failure outside the event being processed: retried until it clears, never dead-lettered."""


class ModelUnavailable(InfrastructureError):
    """A registered model cannot be loaded here (missing source, changed weights, wrong dimension)."""


class EngineStopped(InfrastructureError):
    """The embedding engine is closed, or its thread is gone."""


class ProviderError(InfrastructureError):
    """An embedding API call failed for a reason outside the texts: retried and reported, never dead-lettered.

    ``kind`` classifies it: ``auth``, ``rate_limited``, ``server_error``, ``timeout``,
    ``unreachable``, ``wrong_dimension``, ``malformed`` or ``rejected`` (a request the
    endpoint refuses whatever the texts: an unknown model, bad options).
    """

    def __init__(self, kind: str, message: str, *, retry_after: float | None = None, retryable: bool = True):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.retry_after = retry_after  # seconds the endpoint asked us to wait (Retry-After)
        self.retryable = retryable


class ModelHalted(InfrastructureError):
    """Segue stopped writing a model until an operator acts: its API key was refused, or its canaries drifted."""


class InputRejected(ValueError):
    """The embedding endpoint refuses one text on its own (too long): that event's fault, dead-lettered."""
