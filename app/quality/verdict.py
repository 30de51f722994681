"""Is the new model better? Paired statistics over per-query scores, and the verdict they support.

For each query the two models' scores pair up; the differences (new − old) give:

* a paired bootstrap confidence interval of the mean difference (scipy.stats.bootstrap);
* a paired randomization test of "no difference" (scipy.stats.permutation_test, signs
  flipped within pairs), two-sided;
* a verdict against a threshold — the non-inferiority margin (say −0.01: the new model
  may not lose more than that), or a required gain when one is set: ``pass`` when the
  whole interval is above it, ``fail`` when the whole interval is below it, otherwise
  ``inconclusive`` (too few queries, or too close to call).

Slices (queries grouped by a metadata field) are compared the same way, and each is tested
against the threshold itself (:func:`slices_below`): one-sided, "this slice's mean difference
is below the threshold", its p-values corrected for multiplicity by Holm's method; a slice
significantly below the threshold after correction fails the verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05


@dataclass(frozen=True)
class Comparison:
    """New against old on one metric over the same queries."""

    queries: int
    old_mean: float
    new_mean: float
    mean_difference: float
    ci_low: float
    ci_high: float
    confidence: float
    p_value: float

    def as_dict(self) -> dict:
        return asdict(self)


def compare(old: np.ndarray, new: np.ndarray, *, confidence: float = 0.95, resamples: int = 10_000,
            seed: int = 0) -> Comparison:
    """Paired bootstrap interval and randomization test of ``new − old`` (one score per query each)."""
    old, new = np.asarray(old, dtype=float), np.asarray(new, dtype=float)
    differences = new - old
    if len(differences) < 2:  # nothing to resample: the difference could be anything
        mean = float(differences.mean()) if len(differences) else 0.0
        return Comparison(len(differences), float(old.sum()), float(new.sum()), mean, -np.inf, np.inf, confidence, 1.0)
    interval = stats.bootstrap((differences,), np.mean, confidence_level=confidence, n_resamples=resamples,
                               method="percentile", random_state=seed).confidence_interval
    p_value = stats.permutation_test(
        (old, new), lambda x, y, axis: np.mean(y - x, axis=axis), permutation_type="samples",
        n_resamples=resamples, alternative="two-sided", vectorized=True, random_state=seed).pvalue
    return Comparison(len(differences), float(old.mean()), float(new.mean()), float(differences.mean()),
                      float(interval.low), float(interval.high), confidence, float(p_value))


def decide(comparison: Comparison, threshold: float) -> str:
    """``pass`` when the interval is all above ``threshold``, ``fail`` when all below, else ``inconclusive``."""
    if comparison.ci_low > threshold:
        return "pass"
    if comparison.ci_high < threshold:
        return "fail"
    return "inconclusive"


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class SliceTest:
    """One slice against the threshold: the one-sided p of "its mean difference is below it", raw and Holm-corrected."""

    p_below: float
    p_holm: float

    @property
    def below(self) -> bool:
        """Whether the slice is significantly below the threshold after correction (it fails the verdict)."""
        return self.p_holm < ALPHA


def p_below(differences: np.ndarray, threshold: float, *, resamples: int = 10_000, seed: int = 0) -> float:
    """One-sided p of "the mean of ``differences`` is below ``threshold``".

    A sign-flip randomization test of mean(d − threshold) < 0 (the differences shifted by the
    threshold, signs flipped within pairs); 1.0 with fewer than two differences.
    """
    shifted = np.asarray(differences, dtype=float) - threshold
    if len(shifted) < 2:
        return 1.0
    return float(stats.permutation_test((shifted,), np.mean, permutation_type="samples", alternative="less",
                                        n_resamples=resamples, random_state=seed).pvalue)


def slices_below(differences: Mapping[str, np.ndarray], threshold: float, *, resamples: int = 10_000,
                 seed: int = 0) -> dict[str, SliceTest]:
    """Each slice's per-query differences (new − old) tested against ``threshold``, Holm-corrected across slices."""
    raw = {name: p_below(d, threshold, resamples=resamples, seed=seed) for name, d in differences.items()}
    return {name: SliceTest(p, adjusted) for (name, p), adjusted in zip(raw.items(), holm(list(raw.values())))}
