"""The logistic-regression head on cached features against scipy's L-BFGS, and the L2 choice."""

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import log_softmax

from jaxtl.core.errors import ConfigError
from jaxtl.features.featureset import FeatureSet
from jaxtl.features.logistic import fit_logistic
from jaxtl.models.classifier import Head


def _blobs(n, dim=6, classes=3, seed=0, noise=1.5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 2
    labels = rng.integers(0, classes, n)
    # Non-standardised features (offset and scale per dimension) so the folding is exercised.
    x = (centres[labels] + noise * rng.normal(size=(n, dim))) * np.linspace(0.5, 5, dim) + 3.0
    return x.astype(np.float32), labels.astype(np.int32)


def _reference_logistic(x, y, classes, l2):
    """`mean CE + l2/2 |W|^2` on standardised x, minimised by scipy (float64)."""
    mean, std = x.mean(0), x.std(0)
    z = (x.astype(np.float64) - mean) / std
    d = z.shape[1]

    def objective(theta):
        w, b = theta[: d * classes].reshape(d, classes), theta[d * classes :]
        logp = log_softmax(z @ w + b, axis=1)
        p = np.exp(logp)
        p[np.arange(len(y)), y] -= 1
        grad_w = z.T @ p / len(y) + l2 * w
        loss = -logp[np.arange(len(y)), y].mean() + 0.5 * l2 * np.sum(w**2)
        return loss, np.concatenate([grad_w.ravel(), p.mean(0)])

    theta = minimize(objective, np.zeros(d * classes + classes), jac=True, method="L-BFGS-B",
                     options={"gtol": 1e-10, "maxiter": 5000}).x
    w, b = theta[: d * classes].reshape(d, classes), theta[d * classes :]
    return w / std[:, None], b - (mean / std) @ w  # folded to raw inputs


@pytest.mark.parametrize("l2", [1e-3, 0.1])
def test_logistic_regression_matches_scipy(l2):
    x, y = _blobs(120)
    val = FeatureSet([x[:0]], y[:0])
    fit = fit_logistic(FeatureSet([x], y), val, 3, l2_grid=(l2,), tol=1e-6)
    w, b = _reference_logistic(x, y, 3, l2)
    ours = x @ np.asarray(fit.params["fc"]["kernel"]) + np.asarray(fit.params["fc"]["bias"])
    ref = x @ w + b
    np.testing.assert_allclose(np.exp(log_softmax(ours, 1)), np.exp(log_softmax(ref, 1)), atol=2e-3)


def test_l2_is_chosen_on_val_from_the_whole_grid():
    x, y = _blobs(400, dim=40, noise=4.0, seed=1)
    train, val = FeatureSet([x[:60]], y[:60]), FeatureSet([x[60:]], y[60:])  # few examples, many dims: overfits
    grid = (1e-6, 1e-3, 1e-1, 1.0, 10.0)
    fit = fit_logistic(train, val, 3, l2_grid=grid)
    assert [r["l2"] for r in fit.history] == pytest.approx(grid)
    best = max(fit.history, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert fit.chosen["l2"] == best["l2"]
    # the weakest L2 fits the 60 training examples best and does not generalise best
    assert fit.history[0]["train_loss"] < fit.history[-1]["train_loss"]
    assert fit.chosen["l2"] > grid[0]
    logits = np.asarray(Head(num_classes=3).apply({"params": fit.params}, x[60:]))  # folded: raw features in
    assert np.mean(logits.argmax(1) == y[60:]) == pytest.approx(fit.chosen["val_accuracy"], abs=1e-6)


def test_logistic_without_val_needs_a_single_l2():
    x, y = _blobs(30)
    with pytest.raises(ConfigError, match="needs a val split"):
        fit_logistic(FeatureSet([x], y), FeatureSet([x[:0]], y[:0]), 3, l2_grid=(0.1, 1.0))


def test_fits_of_nearby_sizes_share_one_compiled_solver():
    """The solver is compiled for padded shapes: a second fit with other numbers of examples and features in the
    same bucket compiles nothing (and the padding changes nothing: the scipy comparison above runs padded)."""
    from jaxtl.features.logistic import _bucket, _lbfgs

    assert (_bucket(70), _bucket(90), _bucket(10), _bucket(40)) == (96, 96, 64, 64)
    x, y = _blobs(90, dim=40)
    fit_logistic(FeatureSet([x[:70, :10]], y[:70]), FeatureSet([x[70:, :10]], y[70:]), 3, l2_grid=(1e-2, 1.0))
    compiled = _lbfgs._cache_size()
    fit = fit_logistic(FeatureSet([x], y), FeatureSet([x[:20]], y[:20]), 3, l2_grid=(1e-2, 1.0))
    assert _lbfgs._cache_size() == compiled
    assert fit.params["fc"]["kernel"].shape == (40, 3) and fit.chosen["train_accuracy"] > 0.5


def test_a_solve_whose_steps_no_longer_move_stops_before_max_iter():
    """Started at its own solution with a gradient tolerance of 0 (never met in float32), the solver soon takes
    steps that leave the parameters as they were; it stops there, not after `max_iter` steps that all fail alike
    (weakly regularised paths stalled for 1,000 steps at XLA's level 0, 25 s a fit), and keeps its objective."""
    import jax.numpy as jnp
    import optax

    from jaxtl.features.logistic import _lbfgs

    x, y = _blobs(64, dim=16, classes=2)
    x = (x - x.mean(0)) / x.std(0)
    weights, l2 = jnp.ones(64), jnp.float32(0.1)
    solution, _ = _lbfgs(x, y, weights, l2, {"kernel": jnp.zeros((16, 2)), "bias": jnp.zeros(2)}, 1000, 1e-4)
    stopped, iterations = _lbfgs(x, y, weights, l2, solution, 1000, 0.0)

    def objective(p):
        return float(optax.softmax_cross_entropy_with_integer_labels(x @ p["kernel"] + p["bias"], y).mean()
                     + 0.5 * l2 * jnp.sum(p["kernel"] ** 2))

    assert 1 <= int(iterations) < 1000 and objective(stopped) <= objective(solution)
