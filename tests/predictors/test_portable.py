"""Portable JSON models give exactly scikit-learn's predictions, and load where scikit-learn is absent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.ensemble import ExtraTreesRegressor, GradientBoostingRegressor, RandomForestRegressor
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.tree import DecisionTreeRegressor

from predictors.portable import FORMAT_VERSION, ByClass, Roofline, RooflineTerm, export_model, load_model
from predictors.tree_eval import BitvectorScorer, TreeWalker


def _data(seed: int = 0, rows: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Wide value ranges (FLOPs-sized columns next to small ones) exercise the float32 split comparison.
    x = np.column_stack([rng.integers(1, 97, rows), rng.uniform(0, 1, rows), rng.uniform(1e6, 5e9, rows)])
    y = np.log1p(x[:, 0]) + np.ceil(x[:, 0] / 16) * 0.3 + x[:, 1] ** 2 + x[:, 2] * 1e-9 + rng.normal(0, 0.05, rows)
    return x, y


ESTIMATORS: dict[str, Any] = {
    "decision_tree": DecisionTreeRegressor(random_state=0),
    "random_forest": RandomForestRegressor(n_estimators=20, random_state=0),
    "extra_trees": ExtraTreesRegressor(n_estimators=20, random_state=0),
    "gradient_boosting": GradientBoostingRegressor(n_estimators=50, subsample=0.8, random_state=0),
    "gradient_boosting_huber_zero_init": GradientBoostingRegressor(n_estimators=30, loss="huber", init="zero"),
    "gradient_boosting_absolute_error": GradientBoostingRegressor(n_estimators=30, loss="absolute_error"),
    "linear_regression": LinearRegression(),
    "ridge": Ridge(alpha=0.5, solver="svd"),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_json_round_trip_predicts_exactly_like_sklearn(name: str) -> None:
    x, y = _data()
    estimator = ESTIMATORS[name].fit(x, y)
    text = json.dumps(export_model(estimator).to_json())
    restored = load_model(json.loads(text))
    x_new, _ = _data(seed=1, rows=500)
    expected = estimator.predict(x_new)
    got = restored.predict(x_new)
    if name in ("linear_regression", "ridge"):
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    else:
        # Trees are summed in scikit-learn's order, so even the last bit agrees.
        np.testing.assert_array_equal(got, expected)


def test_json_loads_in_a_process_without_sklearn(tmp_path: Path) -> None:
    x, y = _data()
    forest = RandomForestRegressor(n_estimators=10, random_state=0).fit(x, y)
    boosting = GradientBoostingRegressor(n_estimators=20, random_state=0).fit(x, y)
    x_new, _ = _data(seed=2, rows=50)
    (tmp_path / "models.json").write_text(json.dumps([export_model(m).to_json() for m in (forest, boosting)]))
    np.save(tmp_path / "x.npy", x_new)
    script = f"""
import json, sys
import numpy as np
sys.modules["sklearn"] = None  # any import of scikit-learn now raises ImportError
from predictors.portable import load_model
models = [load_model(m) for m in json.load(open({str(tmp_path / "models.json")!r}))]
x = np.load({str(tmp_path / "x.npy")!r})
np.save({str(tmp_path / "out.npy")!r}, np.stack([m.predict(x) for m in models]))
assert "sklearn.ensemble" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    got = np.load(tmp_path / "out.npy")
    np.testing.assert_array_equal(got[0], forest.predict(x_new))
    np.testing.assert_array_equal(got[1], boosting.predict(x_new))


def test_deep_forest_and_many_rows_are_chunked_consistently() -> None:
    x, y = _data(rows=800)
    forest = RandomForestRegressor(n_estimators=40, random_state=0).fit(x, y)
    model = load_model(export_model(forest).to_json())
    x_new, _ = _data(seed=3, rows=20_000)
    np.testing.assert_array_equal(model.predict(x_new), forest.predict(x_new))


def test_roofline_json_round_trip_with_class_terms() -> None:
    model = Roofline(
        pooled=RooflineTerm(1e-9, 2e-8, 0.01, compute_column=0),
        memory_column=1,
        n_features=3,
        class_column=2,
        classes={1: RooflineTerm(1e-8, 0.0, 0.0, compute_column=0)},
    )
    x = np.array([[1e6, 1e4, 0], [1e9, 1e5, 0], [1e6, 1e4, 1]])
    np.testing.assert_array_equal(load_model(json.loads(json.dumps(model.to_json()))).predict(x), model.predict(x))
    np.testing.assert_allclose(model.predict(x), [max(1e-3, 2e-4) + 0.01, max(1.0, 2e-3) + 0.01, 1e-2])
    with pytest.raises(ValueError, match="non-negative"):
        RooflineTerm(-1.0, 0.0, 0.0, compute_column=0)


def test_unsupported_estimator_is_refused() -> None:
    from sklearn.neighbors import KNeighborsRegressor

    x, y = _data()
    with pytest.raises(ValueError, match="KNeighborsRegressor"):
        export_model(KNeighborsRegressor().fit(x, y))
    with pytest.raises(ValueError, match="init"):
        export_model(GradientBoostingRegressor(n_estimators=5, init=LinearRegression()).fit(x, y))


def test_bad_documents_name_the_field() -> None:
    x, y = _data()
    data = export_model(DecisionTreeRegressor(max_depth=3).fit(x, y)).to_json()
    with pytest.raises(ValueError, match="format_version"):
        load_model({**data, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match="type"):
        load_model({**data, "type": "neural_net"})
    with pytest.raises(ValueError, match="trees"):
        load_model({k: v for k, v in data.items() if k != "trees"})


def test_bad_feature_matrices_are_refused() -> None:
    x, y = _data()
    model = load_model(export_model(DecisionTreeRegressor(max_depth=3).fit(x, y)).to_json())
    with pytest.raises(ValueError, match="columns"):
        model.predict(x[:, :2])
    bad = x[:3].copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.predict(bad)


@pytest.mark.parametrize("max_leaf_nodes", [2, 8, 16, 32, 64, None])
def test_bitvector_scorer_and_tree_walker_land_in_the_same_leaves(max_leaf_nodes: int | None) -> None:
    x, y = _data(rows=400)
    forest = RandomForestRegressor(n_estimators=12, max_leaf_nodes=max_leaf_nodes, random_state=0).fit(x, y)
    trees = export_model(forest).trees  # type: ignore[attr-defined]
    x_new = np.vstack([x, _data(seed=4, rows=3000)[0]]).astype(np.float32).astype(np.float64)
    walked = TreeWalker(trees, n_features=3).leaf_values(x_new)
    if max_leaf_nodes is None:
        assert not BitvectorScorer.fits(trees)  # fully grown trees on 400 rows have far more than 64 leaves
        return
    assert BitvectorScorer.fits(trees)
    np.testing.assert_array_equal(BitvectorScorer(trees, n_features=3).leaf_values(x_new), walked)


def test_malformed_trees_are_refused() -> None:
    x, y = _data()
    data = export_model(DecisionTreeRegressor(max_depth=2).fit(x, y)).to_json()
    looped = json.loads(json.dumps(data))
    looped["trees"][0]["children_left"][0] = 0
    with pytest.raises(ValueError, match="children"):
        load_model(looped)
    short = json.loads(json.dumps(data))
    short["trees"][0]["value"] = short["trees"][0]["value"][:-1]
    with pytest.raises(ValueError, match="equal length"):
        load_model(short)


def test_by_class_routes_rows_and_defaults_unseen_classes() -> None:
    x, y = _data()
    classes = (x[:, 0] > 48).astype(float)
    xc = np.column_stack([x, classes])
    low = DecisionTreeRegressor(max_depth=3).fit(xc[classes == 0], y[classes == 0])
    model = ByClass({0: export_model(low)}, class_column=3, n_features=4, default=0.0)
    restored = load_model(json.loads(json.dumps(model.to_json())))
    got = restored.predict(xc)
    np.testing.assert_array_equal(got[classes == 0], low.predict(xc[classes == 0]))
    assert (got[classes == 1] == 0.0).all()
