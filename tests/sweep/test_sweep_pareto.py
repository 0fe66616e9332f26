"""Pareto front: a hand-made set with known answers, and agreement with a brute-force check."""

import math

import numpy as np
import pytest

from sim.pareto import pareto_front, pareto_mask


def test_hand_made_front_fps_up_energy_down():
    # (fps: max, energy: min)
    pts = [
        (10.0, 5.0),  # A: fastest -> front
        (8.0, 3.0),  # B: front
        (6.0, 3.0),  # C: same energy as B, slower -> dominated by B
        (10.0, 6.0),  # D: as fast as A, more energy -> dominated by A
        (4.0, 1.0),  # E: least energy -> front
        (8.0, 3.0),  # F: duplicate of B: equal points do not dominate each other
        (math.nan, 0.5),  # G: unmeasured -> never on the front
        (3.0, 1.0),  # H: dominated by E
    ]
    mask = pareto_mask(pts, ["max", "min"])
    assert mask.tolist() == [True, True, False, False, True, True, False, False]


def test_three_objectives_and_senses_matter():
    pts = [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (1.0, 2.0, 0.5)]
    assert pareto_mask(pts, ["min", "min", "min"]).tolist() == [True, False, True]
    assert pareto_mask(pts, ["max", "max", "max"]).tolist() == [False, True, False]


def _naive(values, senses):
    signs = np.array([-1 if s == "max" else 1 for s in senses])
    cost = np.asarray(values) * signs
    out = []
    for i, a in enumerate(cost):
        dominated = any(j != i and np.all(b <= a) and np.any(b < a) for j, b in enumerate(cost))
        out.append(not dominated)
    return np.array(out)


@pytest.mark.parametrize("n,k", [(60, 2), (80, 3), (1100, 2)])
def test_matches_brute_force(n, k):
    rng = np.random.default_rng(n)
    values = rng.integers(0, 12, size=(n, k)).astype(float)  # many ties on purpose
    senses = ["max", "min", "min"][:k]
    if n > 500:  # the blocked path (1024 rows per block) against a vectorised naive check
        signs = np.array([-1 if s == "max" else 1 for s in senses])
        cost = values * signs
        le = (cost[None] <= cost[:, None]).all(2)
        lt = (cost[None] < cost[:, None]).any(2)
        expected = ~(le & lt).any(1)
    else:
        expected = _naive(values, senses)
    assert (pareto_mask(values, senses) == expected).all()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="sense"):
        pareto_mask([(1, 2)], ["max", "up"])
    with pytest.raises(ValueError, match="2 objective columns but 1"):
        pareto_mask([(1, 2)], ["max"])


def test_no_measured_objective_means_no_front():
    # every point infeasible: all objective columns dropped; every point was "on the front"
    assert not pareto_mask(np.empty((3, 0)), []).any()


def test_pareto_front_on_a_dataframe():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"fps": [1.0, 2.0, 3.0], "energy_per_frame_j": [1.0, 1.0, 5.0]})
    front = pareto_front(df, {"fps": "max", "energy_per_frame_j": "min"})
    assert front.index.tolist() == [1, 2]
    with pytest.raises(ValueError, match="area_mm2"):
        pareto_front(df, {"area_mm2": "min"})
