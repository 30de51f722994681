"""The one rate limiter Segue paces work with: a well-kept leaky bucket (pyrate-limiter)."""

from __future__ import annotations

import math

from pyrate_limiter import Limiter, Rate


def per_second(rate: float, *, burst: int | None = None) -> Limiter:
    """A limiter letting at most ``rate`` acquisitions a second through.

    ``burst`` is how many may pass at once: by default ⌈rate/100⌉, so the rate is a pace
    (one every 10 ms at most rates) rather than an allowance to spend at once. A
    fractional rate (0.5) allows one every 2 s.
    """
    if rate <= 0:
        raise ValueError(f"a rate must be positive, not {rate}")
    burst = burst or max(1, math.ceil(rate / 100))
    return Limiter(Rate(burst, math.ceil(burst * 1000 / rate)), buffer_ms=0)
