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
