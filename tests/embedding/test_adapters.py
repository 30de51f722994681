"""The adapter math: maps recovered exactly where one exists, poor pairs scored poor, hostile pairs refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from segue.client.search import calibrate
from segue.embedding import adapters as maps


def unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """``n`` unit vectors in 20 clusters: neighbourhoods a map has to keep."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dim))
    return unit(centres[rng.integers(0, 20, n)] + 0.4 * rng.normal(size=(n, dim)))


def test_a_rotation_is_recovered_exactly_and_chosen():
    new = clustered(600, 32, seed=1)
    rotation, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(32, 32)))
    old = new @ rotation
    fitted = maps.fit(new, old, kinds=maps.KINDS)
    assert fitted.space_map.kind == "procrustes" and fitted.pairs == 600
    assert fitted.retention == 1.0 and fitted.held_out["procrustes"]["mse"] < 1e-10
    np.testing.assert_allclose(fitted.space_map.apply(new), old, atol=1e-5)


def test_a_narrower_old_space_is_bridged_by_a_projection():
    """The old model keeps 16 of 48 dimensions of a rotated space (a distilled, narrower model)."""
    new = clustered(800, 48, seed=3)
    rotation, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(48, 48)))
    old = unit((new @ rotation)[:, :16] + 0.02 * np.random.default_rng(5).normal(size=(800, 16)))
    fitted = maps.fit(new, old)
    assert fitted.space_map.matrix.shape == (48, 16) and fitted.space_map.apply(new[:3]).shape == (3, 16)
    assert fitted.retention > 0.6, fitted.held_out


def test_pairs_that_do_not_belong_together_score_a_poor_retention():
    new = clustered(600, 32, seed=6)
    old = clustered(600, 32, seed=7)[np.random.default_rng(8).permutation(600)]
    fitted = maps.fit(new, old, kinds=maps.KINDS)
    assert fitted.retention < 0.1, fitted.held_out


def test_a_map_survives_its_round_trip_through_bytes_bit_for_bit():
    fitted = maps.fit(clustered(200, 24, seed=9), clustered(200, 12, seed=10), kinds=("affine",))
    again = maps.SpaceMap.from_bytes("affine", fitted.space_map.to_bytes())
    assert again.matrix.tobytes() == fitted.space_map.matrix.tobytes()
    assert again.bias.tobytes() == fitted.space_map.bias.tobytes() and again.kind == "affine"


@pytest.mark.parametrize("new, old, message", [
    (np.ones((10, 4)), np.ones((10, 4)), "at least 50"),
    (np.ones((60, 4)), np.ones((59, 4)), "as many rows"),
    (np.ones(60), np.ones(60), "as many rows"),
    (np.full((60, 4), np.nan), np.ones((60, 4)), "finite"),
    (np.ones((60, 4)), np.full((60, 4), np.inf), "finite"),
])
def test_pairs_an_adapter_cannot_learn_from_are_refused(new, old, message):
    with pytest.raises(maps.AdapterError, match=message):
        maps.fit(new, old)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(50, 90), st.integers(1, 6)),
                  elements=st.floats(-1e6, 1e6, allow_nan=False)),
       st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_any_finite_pairs_give_a_finite_map_and_a_retention_between_0_and_1(new, old_dim, seed):
    """Zero rows, repeated rows, huge and tiny values: the fit ends with finite figures, never NaN."""
    old = np.random.default_rng(seed).normal(size=(len(new), old_dim))
    fitted = maps.fit(new, old, kinds=maps.KINDS, seed=seed)
    assert 0.0 <= fitted.retention <= 1.0
    assert np.isfinite(fitted.space_map.matrix).all() and np.isfinite(fitted.space_map.bias).all()
    assert np.isfinite(fitted.space_map.apply(new)).all()


@given(st.lists(st.tuples(st.floats(-1, 1), st.floats(-1, 1)), max_size=40))
def test_calibration_gives_bridged_scores_the_anchors_mean_and_spread_of_new_scores(anchors):
    """Moment matching: calibrated, the anchors' bridged scores have their new scores' mean and spread (where
    those can be told: two anchors with bridged scores apart); one anchor shifts; none changes nothing."""
    line = calibrate(anchors)
    assert np.isfinite([line.slope, line.intercept]).all()
    if not anchors:
        assert (line.slope, line.intercept) == (1.0, 0.0)
        return
    new, bridged = np.array(anchors).T
    calibrated = np.array([line(b) for b in bridged])
    assert calibrated.mean() == pytest.approx(new.mean(), abs=1e-9)
    if len(anchors) > 1 and bridged.std() > 1e-9:
        assert calibrated.std() == pytest.approx(new.std(), abs=1e-9) and line.slope >= 0
