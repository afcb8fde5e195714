"""The dataset-size x similarity decision matrix (CS231n's transfer-learning notes), filled from measurements.

|                  | similar to ImageNet                    | different from ImageNet                      |
|------------------|----------------------------------------|----------------------------------------------|
| small            | linear classifier on pre-logits        | linear classifier on earlier-layer features  |
| large            | fine-tune the top stages               | fine-tune everything                         |

"Small" is fewer than `LARGE_PER_CLASS` training images per class (median over classes). "Similar" is the
majority vote of the signals of `jaxtl.advice.signals` that the backbone has (no head confidence for headless
weights, no BatchNorm shift for a ViT), each against a threshold set between what the ImageNet-like and the
unlike shared datasets measure with that backbone (`THRESHOLDS`, values in README.md); on a tie the BatchNorm
shift, the widest-margin signal, decides. Every vote is reported with its number so a user can see how clear the
call was.
"""

from __future__ import annotations

LARGE_PER_CLASS = 1000
# Per backbone: mean top-1 probability of the pretrained head at or above, and mean KL (nats/channel) of the
# BatchNorm inputs at or below, say "ImageNet-like"; each threshold sits between what imagenet_sample and
# hymenoptera_data measure and what sign_language_digits measures with that backbone (README.md). Backbones not
# calibrated here use EfficientNet-Lite0's, and the advice says so.
THRESHOLDS = {
    "efficientnet_lite0": {"head_confidence": 0.4, "batchnorm_shift": 0.12},
    "mobilenet_v2": {"head_confidence": None, "batchnorm_shift": 0.09},
}
DEFAULT_THRESHOLDS = "efficientnet_lite0"
MAX_EARLY_GAIN = 0.0  # val-accuracy gain of adding earlier layers to the last one at or below: ImageNet-like

CELLS = {
    ("small", "similar"): "linear probe on pre-logits",
    ("small", "different"): "linear probe on earlier layers",
    ("large", "similar"): "fine-tune the top stages",
    ("large", "different"): "fine-tune everything",
}


def _overrides(strategy: str, **extra) -> list[str]:
    return [f"transfer.strategy={strategy}"] + [f"{key}={value!r}" for key, value in extra.items()]


def decide(measured: dict) -> dict:
    """Places measurements from `jaxtl.advice.measure.measure` in the matrix; returns the advice: the signals'
    votes, the cell, the strategy, config overrides and the reasons."""
    size = measured["size"]
    per_class = size["median_train_per_class"]
    size_class = "large" if per_class >= LARGE_PER_CLASS else "small"

    calibrated = measured["model"] in THRESHOLDS
    thresholds = THRESHOLDS[measured["model"] if calibrated else DEFAULT_THRESHOLDS]
    probe = {tuple(p["layers"]): p for p in measured["layer_probe"]}
    last = probe[("pre_logits",)]
    with_earlier = [p for layers, p in probe.items() if layers != ("pre_logits",) and "pre_logits" in layers]
    best_earlier = max(with_earlier, key=lambda p: (p["val_accuracy"], -p["val_loss"]))
    best_alone = max((p for layers, p in probe.items() if len(layers) == 1 and layers != ("pre_logits",)),
                     key=lambda p: p["val_accuracy"])
    gain = best_earlier["val_accuracy"] - last["val_accuracy"]

    signals = {}
    if measured.get("head_confidence"):
        confidence, limit = measured["head_confidence"]["mean_top1_prob"], thresholds["head_confidence"] or 0.4
        signals["head_confidence"] = {
            "value": confidence, "threshold": limit, "similar": confidence >= limit,
            "says": f"mean top-1 probability of the pretrained head {confidence:.3f} "
                    f"({'>=' if confidence >= limit else '<'} {limit})"}
    if measured.get("batchnorm_shift"):
        shift, limit = measured["batchnorm_shift"]["mean_kl"], thresholds["batchnorm_shift"]
        signals["batchnorm_shift"] = {
            "value": shift, "threshold": limit, "similar": shift <= limit,
            "says": f"BatchNorm inputs sit {shift:.3f} nats/channel from the ImageNet statistics "
                    f"({'<=' if shift <= limit else '>'} {limit})"}
    signals["layer_probe"] = {
        "value": gain, "threshold": MAX_EARLY_GAIN, "similar": gain <= MAX_EARLY_GAIN,
        "says": f"adding earlier layers ({'+'.join(best_earlier['layers'])}) to pre_logits changes probe val "
                f"accuracy by {gain:+.3f} ({last['val_accuracy']:.3f} -> {best_earlier['val_accuracy']:.3f}); "
                f"{best_alone['layers'][0]} alone {best_alone['val_accuracy']:.3f}"}
    votes, count = sum(s["similar"] for s in signals.values()), len(signals)
    tie = 2 * votes == count
    decider = signals.get("batchnorm_shift") or signals.get("head_confidence") or signals["layer_probe"]
    similar = decider["similar"] if tie else 2 * votes > count
    similarity = "similar" if similar else "different"
    cell = (size_class, similarity)

    reasons = [f"{size['train_images']} training images in {size['classes']} classes, median {per_class:g} per "
               f"class: {size_class} (large is >= {LARGE_PER_CLASS} per class)"]
    reasons += [f"{'similar' if s['similar'] else 'different'}: {s['says']}" for s in signals.values()]
    reasons.append(f"{votes} of {count} signals say ImageNet-like: {similarity}"
                   + (" (a tie, decided by the BatchNorm shift)" if tie else ""))
    if not calibrated:
        reasons.append(f"the thresholds were calibrated for {', '.join(THRESHOLDS)}; {measured['model']} uses "
                       f"{DEFAULT_THRESHOLDS}'s, so read the measured values as well as the votes")
    if cell == ("small", "similar"):
        strategy, overrides = "linear_probe", _overrides("linear_probe", **{"head.layers": ("pre_logits",)})
        reasons.append("few images of ImageNet-like content: the pretrained top-layer features already separate "
                       "them and fine-tuning would overfit; train only a linear head (on cached features)")
    elif cell == ("small", "different"):
        layers = tuple(best_earlier["layers"])
        strategy, overrides = "linear_probe", _overrides("linear_probe", **{"head.layers": layers})
        reasons.append(f"few images unlike ImageNet: the last stage's features are the most ImageNet-specific, so "
                       f"the head also reads earlier, more generic layers ({', '.join(layers)}: best probe, val "
                       f"accuracy {best_earlier['val_accuracy']:.3f}). With compute to spare, "
                       "transfer.strategy=finetune_all at a low LR adapts every layer instead")
    elif cell == ("large", "similar"):
        strategy, overrides = "finetune_top", _overrides("finetune_top", **{"transfer.num_stages": 2})
        reasons.append("plenty of ImageNet-like images: fine-tune the last two stages and the head; the generic "
                       "early stages stay frozen")
    else:
        strategy, overrides = "finetune_all", _overrides("finetune_all")
        reasons.append("plenty of images unlike ImageNet: fine-tune every layer, starting from the pretrained "
                       "weights (better than random init even for distant domains), at a low LR")
    return {"size": size_class, "similarity": similarity, "cell": CELLS[cell], "signals": signals,
            "strategy": strategy, "overrides": overrides, "reasons": reasons, "measured": measured}


def format_advice(advice: dict, dataset: str) -> str:
    """The matrix with the dataset's cell marked, the signals, the recommendation and its reasons, as text."""
    m = advice["measured"]
    size = m["size"]
    chosen = (advice["size"], advice["similarity"])
    mark = {cell: ("[x] " if cell == chosen else "[ ] ") + text for cell, text in CELLS.items()}
    width = max(len(v) for v in mark.values()) + 2
    lines = [
        f"dataset  {dataset}: {size['classes']} classes, {size['train_images']} train / {size['val_images']} val "
        f"images, median {size['median_train_per_class']:g} train images per class",
        f"model    {m['model']} ({m['weights']}), {m['input_size']}x{m['input_size']}; measured in {m['seconds']} s",
        "",
        "similarity to ImageNet, measured with the pretrained model:",
        *(f"  {'similar  ' if s['similar'] else 'different'}  {name:16} {s['says']}"
          for name, s in advice["signals"].items()),
        "",
        f"{'':24}{'similar to ImageNet':{width}}different from ImageNet",
        f"{'small (<' + str(LARGE_PER_CLASS) + '/class)':24}{mark[('small', 'similar')]:{width}}"
        f"{mark[('small', 'different')]}",
        f"{'large (>=' + str(LARGE_PER_CLASS) + '/class)':24}{mark[('large', 'similar')]:{width}}"
        f"{mark[('large', 'different')]}",
        "",
        f"recommendation: {advice['cell']} (transfer.strategy={advice['strategy']})",
        "  python run.py train --config CONFIG " + " ".join(f'"--config.{o}"' for o in advice["overrides"]),
        "  (or `train --strategy auto`, which measures and follows this advice)",
        "reasons:",
        *(f"  - {reason}" for reason in advice["reasons"]),
    ]
    return "\n".join(lines)
