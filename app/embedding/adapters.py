"""Maps from one model's embedding space into another's, fitted on documents embedded by both.

During a migration Segue holds documents with a current vector of both models. Those pairs
train an adapter that carries a query embedded by the *new* model into the *old* model's
space, so the documents that still lack a new vector can be searched on the old column
without ever embedding the query with the old model (Drift-Adapter, EMNLP 2025). Two kinds:

``procrustes`` (the default)
    An orthogonal map (``W = U Vᵀ`` from the SVD of ``Xᵀ Y``): a rotation, with the
    dimensions zero-padded or projected when the two widths differ. Keeps angles, so it
    carries queries (short, unlike the documents it was fitted on) as well as documents.
``affine``
    A ridge regression with a bias, the penalty picked on held-out pairs. It keeps documents'
    neighbours as well or better, but carries queries worse: on SciFact
    (``benchmarks/bench_bridged.py``) its held-out retention matched or beat Procrustes' at
    every coverage of both migrations while its bridged nDCG@10 trailed it by up to 0.09.
    Fitted only when asked.

:func:`fit` fits each kind asked on 80 % of the pairs, scores it on the held-out rest by
*retention* (of each held-out document's 10 nearest neighbours in the old space, the share
its mapped new vector finds, corrected for chance: 0 is a random map, 1 a perfect one),
keeps the best and refits it on every pair. Readers put the bridged scores on the new
model's scale per query (:func:`segue.client.search.calibrate`). numpy only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

KINDS = ("procrustes", "affine")
DEFAULT_KINDS = ("procrustes",)
HELD_OUT = 0.2
MAX_HELD_OUT = 2_000  # held-out figures compare every held-out pair with every other
NEIGHBOURS = 10
RIDGE_PENALTIES = (1e-3, 1e-2, 1e-1, 1.0)  # × the mean squared norm of the inputs
MIN_PAIRS = 50


class AdapterError(ValueError):
    """Pairs an adapter cannot be fitted on (too few, mismatched, not finite)."""


@dataclass(frozen=True)
class SpaceMap:
    """``vector @ matrix + bias``, row-normalised: a new-model vector carried into the old model's space."""

    kind: str
    matrix: np.ndarray  # (new width, old width), float32
    bias: np.ndarray  # (old width,), float32; zeros for procrustes

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """``vectors`` (one row each, or one vector) mapped and normalised to unit length."""
        mapped = np.asarray(vectors, dtype=np.float32) @ self.matrix + self.bias
        norms = np.linalg.norm(mapped, axis=-1, keepdims=True)
        return mapped / np.where(norms > 0, norms, 1.0)

    def to_bytes(self) -> bytes:
        """The map as an ``.npz`` archive (what ``model_adapters.weights`` holds)."""
        buffer = io.BytesIO()
        np.savez(buffer, matrix=self.matrix, bias=self.bias)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, kind: str, data: bytes) -> SpaceMap:
        """The map :meth:`to_bytes` wrote."""
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return cls(kind, archive["matrix"].astype(np.float32), archive["bias"].astype(np.float32))


@dataclass(frozen=True)
class Fitted:
    """The chosen map and the held-out figures that chose it."""

    space_map: SpaceMap
    pairs: int
    retention: float  # the chosen kind's held-out neighbour retention
    held_out: dict[str, dict[str, float]]  # kind → {"retention": …, "mse": …}


def fit(new: np.ndarray, old: np.ndarray, *, kinds: tuple[str, ...] = DEFAULT_KINDS, seed: int = 0) -> Fitted:
    """Fit each of ``kinds`` on 80 % of the pairs (row n of ``new`` and of ``old`` embed document n), keep the one
    with the best held-out retention and refit it on every pair."""
    new, old = _checked(new, old)
    order = np.random.default_rng(seed).permutation(len(new))
    cut = len(new) - min(max(int(len(new) * HELD_OUT), NEIGHBOURS + 1), MAX_HELD_OUT)
    train, test = order[:cut], order[cut:]
    candidates = {kind: _fit_kind(kind, new[train], old[train], new[test], old[test]) for kind in kinds}
    held_out = {kind: {"retention": retention(m, new[test], old[test]),
                       "mse": float(np.mean((m.apply(new[test]) - old[test]) ** 2))}
                for kind, m in candidates.items()}
    best = max(kinds, key=lambda kind: held_out[kind]["retention"])
    return Fitted(_fit_kind(best, new, old, new[test], old[test]), len(new), held_out[best]["retention"], held_out)


def retention(space_map: SpaceMap, new: np.ndarray, old: np.ndarray, k: int = NEIGHBOURS) -> float:
    """Of each pair's ``k`` nearest old vectors (among ``old``), the share its mapped new vector finds, corrected
    for chance (what a random map finds, ``k / len(old)``, counts 0), floored at 0."""
    k = min(k, len(old) - 1)
    truth = _top_k(_unit(old) @ _unit(old).T, k)
    found = _top_k(space_map.apply(new) @ _unit(old).T, k)
    share = float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found)]))
    chance = k / len(old)
    return max(0.0, (share - chance) / (1.0 - chance))


def _fit_kind(kind: str, new: np.ndarray, old: np.ndarray, new_test: np.ndarray, old_test: np.ndarray) -> SpaceMap:
    if kind == "procrustes":
        u, _, vt = np.linalg.svd(new.T @ old, full_matrices=False)
        return SpaceMap(kind, (u @ vt).astype(np.float32), np.zeros(old.shape[1], dtype=np.float32))
    new_mean, old_mean = new.mean(axis=0), old.mean(axis=0)
    centred = new - new_mean
    gram, cross = centred.T @ centred, centred.T @ (old - old_mean)
    scale = float(np.trace(gram)) / new.shape[1] or 1.0  # all-equal inputs: the penalty alone
    maps = []
    for penalty in RIDGE_PENALTIES:
        matrix = np.linalg.solve(gram + penalty * scale * np.eye(new.shape[1]), cross)
        maps.append(SpaceMap(kind, matrix.astype(np.float32), (old_mean - new_mean @ matrix).astype(np.float32)))
    return min(maps, key=lambda m: float(np.mean((m.apply(new_test) - old_test) ** 2)))


def _checked(new: np.ndarray, old: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    new, old = np.asarray(new, dtype=np.float64), np.asarray(old, dtype=np.float64)
    if new.ndim != 2 or old.ndim != 2 or len(new) != len(old):
        raise AdapterError(f"pairs must be two matrices of as many rows, not {new.shape} and {old.shape}")
    if len(new) < MIN_PAIRS:
        raise AdapterError(f"an adapter needs at least {MIN_PAIRS} documents embedded by both models, not {len(new)}")
    if not (np.isfinite(new).all() and np.isfinite(old).all()):
        raise AdapterError("pairs must be finite vectors")
    return _unit(new), _unit(old)


def _unit(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


def _top_k(similarities: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-similarities, axis=1, kind="stable")[:, :k]
