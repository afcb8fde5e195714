"""Few-shot linear evaluation (`jaxtl.features.fewshot`, `run.py fewshot`): the ridge regression against an
independent closed form, the shot draws, the kNN vote against a brute-force one, and the command on real
weights."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtl.cli import main
from jaxtl.features.fewshot import (BIAS_FEATURE, draw_shots, fewshot, knn_predict, ridge_classifier,
                                    ridge_predict)
from jaxtl.models.classifier import Head, knn_bank
from tests.conftest import make_image_folder
from tests.helpers import cli, one_line_error


def _blobs(n_per_class: int, classes: int, dim: int, seed: int, spread: float = 1.0, draw: int = 0):
    """Gaussian classes about centres fixed by `seed`; `draw` picks independent samples about them."""
    centres = np.random.default_rng(seed).normal(0, 3, (classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    return centres[y] + np.random.default_rng((seed, draw + 1)).normal(0, spread, (len(y), dim)), y


@pytest.mark.parametrize("n,dim", [(40, 6), (9, 30)])  # primal (N >= D) and dual (D > N) systems
def test_ridge_equals_the_augmented_least_squares_solution(n, dim):
    x, y = _blobs(n // 3 or 1, 3, dim, seed=n)
    l2 = 7.0
    mean, std, weights = ridge_classifier(x, y, 3, l2)
    # reference: min |X w - Y|^2 + l2 |w|^2 as ordinary least squares on [X; sqrt(l2) I] w = [Y; 0]
    design = np.concatenate([(x - x.mean(0)) / (x.std(0) + 1e-5), np.full((len(x), 1), BIAS_FEATURE)], 1)
    targets = 2.0 * np.eye(3)[y] - 1.0
    stacked = np.concatenate([design, np.sqrt(l2) * np.eye(design.shape[1])])
    reference = np.linalg.lstsq(stacked, np.concatenate([targets, np.zeros((design.shape[1], 3))]), rcond=None)[0]
    np.testing.assert_allclose(weights, reference, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(mean, x.mean(0, keepdims=True))
    assert np.array_equal(ridge_predict((mean, std, weights), x), np.argmax(design @ reference, 1))


def test_shots_are_drawn_per_class_nested_and_seeded():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    one, five = draw_shots(labels, 3, 1, seed=4), draw_shots(labels, 3, 5, seed=4)
    assert np.bincount(labels[one], minlength=3).tolist() == [1, 1, 1]
    assert np.bincount(labels[five], minlength=3).tolist() == [5, 3, 5]  # class 1 has only 3
    assert set(one) <= set(five)
    assert not np.array_equal(draw_shots(labels, 3, 5, seed=5), five)
    assert np.array_equal(draw_shots(labels, 3, 5, seed=4), five)


def test_knn_votes_by_cosine_similarity_as_a_brute_force_vote():
    rng = np.random.default_rng(0)
    train, labels, queries = rng.normal(size=(30, 5)), rng.integers(0, 4, 30), rng.normal(size=(12, 5))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    expected = []
    for q in unit(queries):
        sims = unit(train) @ q
        nearest = np.argsort(-sims)[:7]
        votes = [np.maximum(sims[nearest], 0)[labels[nearest] == c].sum() for c in range(4)]
        expected.append(votes / np.sum(votes))
    np.testing.assert_array_equal(knn_predict(train * 3.0, labels, queries, 4, 7), np.argmax(expected, 1))
    # The kNN probe head (a model's head, in JAX) votes the same: its probabilities are the normalised votes.
    head = Head(4, knn=7)
    logits = head.apply({"params": knn_bank(train * 3.0, labels, 4)}, jnp.asarray(queries, jnp.float32))
    np.testing.assert_allclose(np.exp(logits), expected, atol=1e-5)
    empty = head.init(jax.random.key(0), jnp.zeros((2, 5)))
    assert empty["params"]["bank"].shape == (0, 5)
    np.testing.assert_allclose(np.exp(head.apply(empty, jnp.ones((2, 5)))), 0.25)


def test_fewshot_accuracy_rises_with_shots_and_is_chance_on_shuffled_labels():
    x, y = _blobs(60, 5, 16, seed=1, spread=3.0)
    ex, ey = _blobs(40, 5, 16, seed=1, spread=3.0, draw=1)
    result = fewshot(x, y, ex, ey, 5, shots=(1, 25), seeds=4, knn=5)
    assert result["accuracy"][25] > result["accuracy"][1] and result["accuracy"][25] > 0.9
    assert len(result["per_seed"][1]) == 4 and result["std"][1] == pytest.approx(np.std(result["per_seed"][1]))
    assert result["knn_accuracy"][25] > 0.8 and result["fewest_per_class"] == {1: 1, 25: 25}
    shuffled = fewshot(x, y, ex, np.random.default_rng(0).permutation(ey), 5, shots=(25,), seeds=3)
    assert abs(shuffled["accuracy"][25] - 0.2) < 0.1


def test_fewshot_command_on_real_weights(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=("red", "green", "blue"), per_class=6,
                             splits=("train", "val", "test"))
    main(["fewshot", "--model", "efficientnet_lite0", "--data", str(data), "--shots", "1,3", "--seeds", "2",
          "--knn", "3", "--input-size", "32", "--json"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["split"] == "test" and printed["eval_images"] == 18 and printed["classes"] == 3
    assert set(printed["accuracy"]) == {"1", "3"} and set(printed["knn_accuracy"]) == {"1", "3"}
    assert printed["accuracy"]["3"] > 0.8  # solid colours: ImageNet features separate them from 3 shots
    main(["fewshot", "--model", "efficientnet_lite0", "--data", str(data), "--shots", "3,10", "--input-size", "32"])
    table = capsys.readouterr().out
    assert "scored on test (18 images)" in table
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert "scarcest" not in rows["3"] and "(the scarcest class has 6: all of them)" in rows["10"]  # 6 a class
    unsplit = make_image_folder(tmp_path / "unsplit", classes=("red", "green"), per_class=4, splits=())
    for fraction in ("0", "0.01"):  # no val carved: nothing to score on
        one_line_error(cli("fewshot", "--model", "efficientnet_lite0", "--data", unsplit, "--input-size", "32",
                           "--val-fraction", fraction), "fewshot scores on a test or val split", "--val-fraction")
    for bad, says in ((["--shots", "0"], "positive shot counts"), (["--shots", "a,b"], "comma-separated"),
                      (["--data", str(tmp_path / "nowhere")], "nowhere")):
        with pytest.raises(SystemExit) as exit_:
            main(["fewshot", "--model", "efficientnet_lite0", "--data", str(data), "--input-size", "32", *bad])
        assert exit_.value.code == 2 and says in capsys.readouterr().err
