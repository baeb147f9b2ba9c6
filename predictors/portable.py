"""Fitted regressors as plain JSON, evaluated in numpy: no pickle, no joblib, no scikit-learn needed to load.

nn-Meter stored its predictors with pickle and they stopped loading when scikit-learn moved on (its most reported
issue, #131).  Here a fitted model is exported once to arrays (tree nodes, coefficients) and the loader evaluates
those arrays itself, so a newer scikit-learn, or none at all, reads the same predictions back.

Portable model types:

* ``tree_ensemble`` — one or more CART trees combined as ``init + scale * sum(tree(x))`` (random forests and extra
  trees: ``scale = 1 / n_trees``; gradient boosting: the learning rate and the init constant; one decision tree:
  scale 1), evaluated by :mod:`predictors.tree_eval`.
* ``linear`` — ``x @ coef + intercept``.
* ``roofline`` — ``max(a * x[compute], b * x[memory]) + c``: the physically shaped model (MorphNet's latency cost)
  over two feature columns, optionally one term per kernel class; fitted in :mod:`predictors.candidates`.
* ``by_class`` — one of the above per kernel class (a feature column's value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from predictors.tree_eval import LEAF, Tree, build_evaluator

FORMAT_VERSION = 1


class PortableModel(Protocol):
    def predict(self, x: np.ndarray) -> np.ndarray: ...

    def to_json(self) -> dict[str, Any]: ...


def _check_matrix(x: np.ndarray, n_features: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != n_features:
        raise ValueError(f"expected a feature matrix with {n_features} columns, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("feature matrix contains NaN or infinite values")
    return x


def _tree_to_json(tree: Tree) -> dict[str, Any]:
    return {
        "children_left": tree.children_left.tolist(),
        "children_right": tree.children_right.tolist(),
        "feature": tree.feature.tolist(),
        "threshold": tree.threshold.tolist(),
        "value": tree.value.tolist(),
    }


def _tree_from_json(data: dict[str, Any]) -> Tree:
    tree = Tree(
        children_left=np.asarray(data["children_left"], dtype=np.int64),
        children_right=np.asarray(data["children_right"], dtype=np.int64),
        feature=np.asarray(data["feature"], dtype=np.int64),
        threshold=np.asarray(data["threshold"], dtype=np.float64),
        value=np.asarray(data["value"], dtype=np.float64),
    )
    arrays = (tree.children_left, tree.children_right, tree.feature, tree.threshold, tree.value)
    if len({len(a) for a in arrays}) != 1 or not tree.children_left.size:
        raise ValueError("trees: node arrays must be non-empty and of equal length")
    n = len(tree.feature)
    internal = tree.children_left != LEAF
    children = np.concatenate([tree.children_left[internal], tree.children_right[internal]])
    if (children <= 0).any() or (children >= n).any() or len(set(children.tolist())) != len(children):
        raise ValueError("trees: children must index other nodes of the same tree, each once")
    return tree


class TreeEnsemble:
    """``init + scale * sum_t tree_t(x)``, with trees walked level by level in numpy over all rows at once."""

    kind = "tree_ensemble"

    def __init__(
        self, trees: list[Tree], *, n_features: int, init: float = 0.0, scale: float = 1.0, average: bool = False
    ) -> None:
        if not trees:
            raise ValueError("a tree ensemble needs at least one tree")
        self.trees = trees
        self.n_features = n_features
        self.init = float(init)
        self.scale = float(scale)
        # Forests sum their trees and divide once at the end, as scikit-learn does; boosting scales each tree.
        self.average = average
        self._evaluator = build_evaluator(trees, n_features)

    def leaf_values(self, x: np.ndarray) -> np.ndarray:
        """Per tree and row, the value of the leaf the row lands in: shape (trees, rows)."""
        # scikit-learn compares float32 features with float64 thresholds; matching that keeps splits identical.
        x32 = _check_matrix(x, self.n_features).astype(np.float32).astype(np.float64)
        return self._evaluator.leaf_values(x32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        leaves = self.leaf_values(x)
        total = np.zeros(leaves.shape[1], dtype=np.float64)
        # Trees are added one by one in scikit-learn's order, so results agree to the last bit.
        if self.average:
            for tree_values in leaves:
                total += tree_values
            result: np.ndarray = self.init + total / len(leaves)
            return result
        total += self.init
        for tree_values in leaves:
            total += self.scale * tree_values
        return total

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "format_version": FORMAT_VERSION,
            "n_features": self.n_features,
            "init": self.init,
            "scale": self.scale,
            "average": self.average,
            "trees": [_tree_to_json(t) for t in self.trees],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TreeEnsemble:
        return cls(
            [_tree_from_json(t) for t in data["trees"]],
            n_features=int(data["n_features"]),
            init=float(data["init"]),
            scale=float(data["scale"]),
            average=bool(data["average"]),
        )


class LinearModel:
    kind = "linear"

    def __init__(self, coef: np.ndarray, intercept: float) -> None:
        self.coef = np.asarray(coef, dtype=np.float64).ravel()
        self.intercept = float(intercept)

    def predict(self, x: np.ndarray) -> np.ndarray:
        result: np.ndarray = _check_matrix(x, len(self.coef)) @ self.coef + self.intercept
        return result

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "format_version": FORMAT_VERSION,
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LinearModel:
        return cls(np.asarray(data["coef"], dtype=np.float64), float(data["intercept"]))


@dataclass(frozen=True)
class RooflineTerm:
    """``max(a * x[:, compute_column], b * x[:, memory_column]) + c``: seconds per FLOP, per byte, per launch."""

    a: float
    b: float
    c: float
    compute_column: int

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) and v >= 0 for v in (self.a, self.b, self.c)):
            raise ValueError(f"roofline coefficients must be finite and non-negative, got {self}")

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "c": self.c, "compute_column": self.compute_column}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RooflineTerm:
        return cls(float(data["a"]), float(data["b"]), float(data["c"]), int(data["compute_column"]))


class Roofline:
    """A roofline per kernel class (the value of ``class_column``), with a pooled term for classes it never saw.

    One conv2d kind holds depthwise, pointwise, dense k x k and grouped kernels, which run different code paths
    with different attainable FLOP rates; a term per class keeps one class's efficiency out of another's.
    """

    kind = "roofline"

    def __init__(
        self,
        *,
        pooled: RooflineTerm,
        memory_column: int,
        n_features: int,
        class_column: int | None = None,
        classes: dict[int, RooflineTerm] | None = None,
    ) -> None:
        self.pooled = pooled
        self.memory_column = memory_column
        self.n_features = n_features
        self.class_column = class_column
        self.classes = dict(classes or {})
        if self.classes and class_column is None:
            raise ValueError("class terms need a class_column")

    @staticmethod
    def _term(term: RooflineTerm, x: np.ndarray, memory: np.ndarray) -> np.ndarray:
        result: np.ndarray = np.maximum(term.a * x[:, term.compute_column], term.b * memory) + term.c
        return result

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = _check_matrix(x, self.n_features)
        memory = x[:, self.memory_column]
        out = self._term(self.pooled, x, memory)
        for value, term in self.classes.items():
            rows = x[:, self.class_column] == value
            if rows.any():
                out[rows] = self._term(term, x[rows], memory[rows])
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "format_version": FORMAT_VERSION,
            "n_features": self.n_features,
            "memory_column": self.memory_column,
            "pooled": self.pooled.to_json(),
            "class_column": self.class_column,
            "classes": {str(value): term.to_json() for value, term in self.classes.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Roofline:
        class_column = data.get("class_column")
        return cls(
            pooled=RooflineTerm.from_json(data["pooled"]),
            memory_column=int(data["memory_column"]),
            n_features=int(data["n_features"]),
            class_column=None if class_column is None else int(class_column),
            classes={int(value): RooflineTerm.from_json(term) for value, term in data.get("classes", {}).items()},
        )


class ByClass:
    """One model per kernel class (the value of ``class_column``); rows of a class without one get ``default``.

    nn-Meter fits one predictor per kernel type for the same reason: depthwise, pointwise and dense convolutions
    differ in how latency bends with shape, and one model over all of them spends its splits telling them apart.
    """

    kind = "by_class"

    def __init__(self, models: dict[int, PortableModel], *, class_column: int, n_features: int, default: float) -> None:
        self.models = dict(models)
        self.class_column = class_column
        self.n_features = n_features
        self.default = float(default)

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = _check_matrix(x, self.n_features)
        out = np.full(len(x), self.default)
        for value, model in self.models.items():
            rows = x[:, self.class_column] == value
            if rows.any():
                out[rows] = model.predict(x[rows])
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "format_version": FORMAT_VERSION,
            "n_features": self.n_features,
            "class_column": self.class_column,
            "default": self.default,
            "models": {str(value): model.to_json() for value, model in self.models.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ByClass:
        return cls(
            {int(value): load_model(model) for value, model in data["models"].items()},
            class_column=int(data["class_column"]),
            n_features=int(data["n_features"]),
            default=float(data["default"]),
        )


_LOADERS: dict[str, Any] = {
    TreeEnsemble.kind: TreeEnsemble.from_json,
    LinearModel.kind: LinearModel.from_json,
    Roofline.kind: Roofline.from_json,
    ByClass.kind: ByClass.from_json,
}


def load_model(data: dict[str, Any]) -> PortableModel:
    """Rebuild a model from :func:`export_model` / ``to_json`` output.

    Raises:
        ValueError: the ``type`` is unknown or ``format_version`` is newer than this code reads.
    """
    if not isinstance(data, dict):
        raise ValueError("a portable model must be a JSON object")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ValueError(f"format_version: this code reads 1..{FORMAT_VERSION}, got {version!r}")
    loader = _LOADERS.get(data.get("type"))  # type: ignore[arg-type]
    if loader is None:
        raise ValueError(f"type: unknown portable model type {data.get('type')!r}; known: {', '.join(_LOADERS)}")
    try:
        model: PortableModel = loader(data)
    except KeyError as exc:
        raise ValueError(f"{exc.args[0]}: missing from a {data['type']} model") from exc
    return model


def _tree_arrays(fitted_tree: Any) -> Tree:
    tree = fitted_tree.tree_
    if tree.n_outputs != 1:
        raise ValueError("only single-output regression trees are portable")
    return Tree(
        children_left=np.asarray(tree.children_left, dtype=np.int64),
        children_right=np.asarray(tree.children_right, dtype=np.int64),
        feature=np.asarray(tree.feature, dtype=np.int64),
        threshold=np.asarray(tree.threshold, dtype=np.float64),
        value=np.asarray(tree.value, dtype=np.float64).reshape(tree.node_count, -1)[:, 0].copy(),
    )


def export_model(estimator: Any) -> PortableModel:
    """Convert a fitted scikit-learn regressor into a portable model (then ``.to_json()`` it).

    Supported: DecisionTreeRegressor, RandomForestRegressor, ExtraTreesRegressor, GradientBoostingRegressor (init
    None or "zero") and linear models with a 1-D ``coef_`` (LinearRegression, Ridge, Lasso, ...). Uses only the
    public fitted attributes (``tree_``, ``estimators_``, ``init_``, ``coef_``), not sklearn's private helpers.

    Raises:
        ValueError: the estimator is of an unsupported type or configuration.
    """
    name = type(estimator).__name__
    n_features = int(getattr(estimator, "n_features_in_", 0))
    if name == "DecisionTreeRegressor":
        return TreeEnsemble([_tree_arrays(estimator)], n_features=n_features)
    if name in ("RandomForestRegressor", "ExtraTreesRegressor"):
        trees = [_tree_arrays(t) for t in estimator.estimators_]
        return TreeEnsemble(trees, n_features=n_features, average=True)
    if name == "GradientBoostingRegressor":
        init_estimator = estimator.init_
        if isinstance(init_estimator, str) and init_estimator == "zero":
            init = 0.0
        elif type(init_estimator).__name__ == "DummyRegressor":
            init = float(np.asarray(init_estimator.constant_).ravel()[0])
        else:
            raise ValueError(f"GradientBoostingRegressor with init={type(init_estimator).__name__} is not portable")
        trees = [_tree_arrays(t) for t in np.asarray(estimator.estimators_).ravel()]
        return TreeEnsemble(trees, n_features=n_features, init=init, scale=float(estimator.learning_rate))
    coef = getattr(estimator, "coef_", None)
    if coef is not None and type(estimator).__module__.startswith("sklearn.linear_model"):
        coef = np.asarray(coef, dtype=np.float64)
        if coef.ndim != 1:
            raise ValueError(f"{name} with multi-output coef_ {coef.shape} is not portable")
        return LinearModel(coef, float(np.asarray(estimator.intercept_).ravel()[0]))
    raise ValueError(f"{name} is not a supported portable regressor")


__all__ = [
    "FORMAT_VERSION",
    "ByClass",
    "LinearModel",
    "PortableModel",
    "Roofline",
    "RooflineTerm",
    "TreeEnsemble",
    "export_model",
    "load_model",
]
