"""How similar a dataset is to the pretraining data, measured with the pretrained model itself.

Three signals, each cheap next to training:

- **head confidence**: the mean top-1 softmax probability of the pretrained 1000-class head. Images of
  ImageNet-like content get confident predictions; a domain ImageNet never showed (hand signs on a flat
  background, X-rays, spectrograms) gets spread-out ones.
- **BatchNorm input shift**: every BatchNorm layer stores the mean and variance of its input over ImageNet. The
  data's per-channel input statistics are compared with them as the KL divergence between the two Gaussians
  (nats per channel, averaged over channels, then over layers). This is the covariate shift AdaBN
  (Li et al., 2016) corrects; large values mean the pretrained features see inputs unlike their own.
- **early vs last-layer probe**: L2-regularised logistic regression (the cache's linear head) on the pooled
  features of each stage and on the pre-logits, scored on the val split. When an earlier stage predicts as well
  as the last one, the last stage's ImageNet-specific features add nothing for this data (Yosinski et al., 2014).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxtl.core.compiler import jit
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.core.sharding import batch_sharded, replicated, round_to_devices, sum_over_batches
from jaxtl.data.pipeline import batches
from jaxtl.data.preprocess import normalize
from jaxtl.data.split import Split
from jaxtl.features.featureset import FeatureSet
from jaxtl.features.logistic import DEFAULT_L2_GRID, fit_logistic
from jaxtl.models.batchnorm import BatchNorm


def head_confidence(pre_logits: np.ndarray, head_params: dict) -> dict:
    """Mean and median top-1 probability, and mean normalised entropy, of the pretrained head on `pre_logits`."""
    logits = pre_logits @ np.asarray(head_params["fc"]["kernel"]) + np.asarray(head_params["fc"]["bias"])
    logits = logits - logits.max(1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(1, keepdims=True)
    top1 = probs.max(1)
    entropy = -(probs * np.log(np.maximum(probs, 1e-12))).sum(1) / np.log(probs.shape[1])
    return {"mean_top1_prob": float(top1.mean()), "median_top1_prob": float(np.median(top1)),
            "mean_normalized_entropy": float(entropy.mean())}


def _gaussian_kl(mean_d, var_d, mean_r, var_r):
    """KL(N(mean_d, var_d) || N(mean_r, var_r)) per channel."""
    return 0.5 * (np.log(var_r / var_d) + (var_d + (mean_d - mean_r) ** 2) / var_r - 1.0)


def batchnorm_shift(model: nn.Module, variables: dict, split: Split, prep: Preprocessing, mesh: Mesh,
                    batch_size: int = 32, max_images: int = 256) -> dict:
    """KL divergence (nats per channel) of the data's BatchNorm input statistics from the running statistics,
    per layer group and averaged over all BatchNorm layers, from up to `max_images` images of `split`."""
    batch_size = round_to_devices(batch_size, mesh)
    subset = split.subset(np.linspace(0, len(split) - 1, min(max_images, len(split))).round().astype(int))
    epsilons: dict[str, float] = {}

    def stats(variables, batch):
        found = {}

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, BatchNorm) and context.method_name == "__call__":
                x = args[0].astype(jnp.float32)
                mask = batch["mask"][:, None]
                per_image = x.mean(axis=(1, 2)), (x * x).mean(axis=(1, 2))
                path = "/".join(context.module.scope.path)
                found[path] = tuple((v * mask).sum(0) for v in per_image)
                epsilons[path] = context.module.epsilon
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            model.apply(variables, normalize(batch["images"], prep, jnp), train=False)
        return found

    step = jit(stats, in_shardings=(replicated(mesh), batch_sharded(mesh)), out_shardings=replicated(mesh))
    stream = batches(subset, prep, batch_size, train=False)
    totals = sum_over_batches(lambda batch: step(variables, batch), stream, mesh)
    count = len(subset)  # every image once; the padding of the last batch is masked out
    per_layer = {}
    for path, (mean_sum, sq_sum) in totals.items():
        running = variables["batch_stats"]
        for key in path.split("/"):
            running = running[key]
        eps = epsilons[path]
        # E[x^2] over pixels of all images minus the squared mean: the variance BatchNorm would compute
        mean_d = mean_sum / count
        var_d = np.maximum(sq_sum / count - mean_d**2, 0.0) + eps
        var_r = np.asarray(running["var"]) + eps
        per_layer[path] = float(np.mean(_gaussian_kl(mean_d, var_d, np.asarray(running["mean"]), var_r)))
    groups = {}
    for path, value in per_layer.items():
        groups.setdefault(path.split("/")[0], []).append(value)
    return {"mean_kl": float(np.mean(list(per_layer.values()))), "images": int(count),
            "per_group": {g: float(np.mean(v)) for g, v in groups.items()}, "layers": len(per_layer)}


def layer_probe(train: dict[str, np.ndarray], train_labels: np.ndarray, val: dict[str, np.ndarray],
                val_labels: np.ndarray, num_classes: int, candidates: Sequence[Sequence[str]],
                l2_grid: Sequence[float] = DEFAULT_L2_GRID) -> list[dict]:
    """Val accuracy (multi-label: and val mAP) of a logistic-regression head on each candidate layer set (pooled
    features concatenated), fitted as a linear-probe run fits it (the same L2 grid), so the winner's fit is the
    final run's."""
    results = []
    for layers in candidates:
        fit = fit_logistic(FeatureSet([train[name] for name in layers], train_labels),
                           FeatureSet([val[name] for name in layers], val_labels), num_classes, l2_grid)
        results.append({"layers": list(layers), "val_accuracy": fit.chosen["val_accuracy"],
                        **({"val_map": fit.chosen["val_map"]} if "val_map" in fit.chosen else {}),
                        "val_loss": fit.chosen["val_loss"], "l2": fit.chosen["l2"], "seconds": round(fit.seconds, 2)})
    return results
