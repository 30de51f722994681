"""The failure classes Segue tells apart: an event's own fault, or the infrastructure's.

Bad input is dead-lettered with its reason (``segue.schemas.events.InvalidEvent``); an
:class:`InfrastructureError` (a model that cannot load, a stopped engine) is retried
and reported, never dead-lettered, as are transient database errors
(:func:`segue.worker.isolation.is_transient`).
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
    ``unreachable``, ``wrong_dimension``, ``malformed``, ``refused`` (a 4xx answer to one
    request: its shape or one of its inputs may be at fault, which the client finds out) or
    ``rejected`` (the endpoint refuses any request, even one canary text: an unknown model,
    bad options).
    """

    def __init__(self, kind: str, message: str, *, retry_after: float | None = None, retryable: bool = True):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.detail = message
        self.retry_after = retry_after  # seconds the endpoint asked us to wait (Retry-After)
        self.retryable = retryable


class ModelHalted(InfrastructureError):
    """Segue stopped writing a model until an operator acts: its API key was refused, its endpoint refuses every
    request, or its canaries drifted."""


class InputRejected(ValueError):
    """A model gives no usable vector for a text on its own: its endpoint refuses that input alone, the text is
    over a ``truncate=refuse`` limit, or the vector is non-finite, all zeros or malformed. That text's fault for
    that model: the other models' work goes on, and the event is dead-lettered (``input_rejected``)."""
