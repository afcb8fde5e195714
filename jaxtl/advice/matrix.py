"""The dataset-size x similarity decision matrix of the transfer-learning notes (CS231n), with their three sizes,
filled from measurements; each cell orders the candidates that `jaxtl.advice.trials` may try.

|        | similar to ImageNet                            | different from ImageNet                         |
|--------|------------------------------------------------|-------------------------------------------------|
| small  | linear probe on pre-logits                     | linear probe on earlier layers                  |
| medium | fine-tune the top stages (or gradually)        | fine-tune the top stages and earlier ones       |
| large  | fine-tune the top, or everything at a low LR   | fine-tune everything                            |

Size: the training images counted two ways, each against the notes' thresholds, and the smaller tier kept:
in all, small below `MEDIUM_TOTAL` (1,000), large from `LARGE_TOTAL` (10,000); per class (median), small below
`MEDIUM_PER_CLASS` (100), large from `LARGE_PER_CLASS` (1,000). Fine-tuning millions of parameters overfits a few
hundred images however they are spread; and 10,000 images of 100 classes (100 each) are a medium dataset for
each class's decision boundary, not a large one.

Similarity: the majority vote of the signals of `jaxtl.advice.signals` that the backbone has (no head confidence
for headless weights, no BatchNorm shift for a ViT), each against a threshold set between what the ImageNet-like
and the unlike shared datasets measure with that backbone (`THRESHOLDS`, values in README.md); on a tie the
BatchNorm shift, the widest-margin signal, decides. Every vote is reported with its number.
"""

from __future__ import annotations

from jaxtl.models.backbone import PRE_LOGITS
from jaxtl.transfer.strategies import AUTO_CANDIDATES

MEDIUM_TOTAL, LARGE_TOTAL = 1_000, 10_000
MEDIUM_PER_CLASS, LARGE_PER_CLASS = 100, 1_000
SIZES = ("small", "medium", "large")
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
    ("medium", "similar"): "fine-tune the top stages",
    ("medium", "different"): "fine-tune the top and earlier stages",
    ("large", "similar"): "fine-tune the top, or all at a low LR",
    ("large", "different"): "fine-tune everything",
}
# Candidates in the order each cell prefers them (the first is the advice without trials); the cheapest to
# train first among equals: `COST` ranks them.
COST = AUTO_CANDIDATES  # declared with the strategies, so the config's checks know them
ORDER = {  # small data tries only the probes unless `transfer.auto_candidates` names fine-tuning ones
    ("small", "similar"): ("probe_pre_logits", "probe_earlier", "finetune_top_1", "finetune_top_2", "gradual",
                           "finetune_all"),
    ("small", "different"): ("probe_earlier", "probe_pre_logits", "finetune_top_2", "gradual", "finetune_all",
                             "finetune_top_1"),
    ("medium", "similar"): ("finetune_top_1", "finetune_top_2", "gradual", "probe_pre_logits", "probe_earlier",
                            "finetune_all"),
    ("medium", "different"): ("finetune_top_2", "gradual", "finetune_all", "probe_earlier", "probe_pre_logits",
                              "finetune_top_1"),
    ("large", "similar"): ("finetune_top_2", "finetune_all", "gradual", "finetune_top_1", "probe_pre_logits",
                           "probe_earlier"),
    ("large", "different"): ("finetune_all", "gradual", "finetune_top_2", "finetune_top_1", "probe_earlier",
                             "probe_pre_logits"),
}
DESCRIPTIONS = {
    "probe_pre_logits": "linear probe on the pre-logits (cached features)",
    "probe_earlier": "linear probe on earlier layers and the pre-logits (cached features)",
    "finetune_top_1": "fine-tune the last stage and the head",
    "finetune_top_2": "fine-tune the last two stages and the head",
    "gradual": "gradual unfreezing (head, then one more stage per phase)",
    "finetune_all": "fine-tune everything",
}


def size_tier(size: dict) -> tuple[str, str]:
    """`(tier, reason)` from the training-image counts, in all and per class."""
    total, per_class = size["train_images"], size["median_train_per_class"]
    by_total = 0 if total < MEDIUM_TOTAL else 1 if total < LARGE_TOTAL else 2
    by_class = 0 if per_class < MEDIUM_PER_CLASS else 1 if per_class < LARGE_PER_CLASS else 2
    tier = SIZES[min(by_total, by_class)]
    return tier, (f"{total} training images in {size['classes']} classes, median {per_class:g} per class: "
                  f"{SIZES[by_total]} in all (medium from {MEDIUM_TOTAL:,}, large from {LARGE_TOTAL:,}), "
                  f"{SIZES[by_class]} per class (medium from {MEDIUM_PER_CLASS}, large from {LARGE_PER_CLASS:,}): "
                  f"{tier}")


def candidate_overrides(candidate: str, earlier_layers: tuple[str, ...], epochs: int) -> list[str]:
    """The config overrides that train `candidate` (`epochs`: the run's, split into phases for gradual)."""
    if candidate == "probe_pre_logits":
        return _overrides("linear_probe", **{"head.layers": (PRE_LOGITS,)})
    if candidate == "probe_earlier":
        return _overrides("linear_probe", **{"head.layers": tuple(earlier_layers)})
    if candidate.startswith("finetune_top_"):
        return _overrides("finetune_top", **{"transfer.num_stages": int(candidate[-1])})
    if candidate == "gradual":
        return _overrides("gradual", **{"transfer.phase_epochs": gradual_phase_epochs(epochs)})
    return _overrides("finetune_all")


def gradual_phase_epochs(epochs: int) -> tuple[int, ...]:
    """`gradual`'s phases over `epochs`: three (head, + the last group, + the one below) when it has three
    epochs or more, the epochs shared out as evenly as they go."""
    phases = 3 if epochs >= 3 else max(epochs, 1)
    return tuple(max(epochs // phases + (1 if i < epochs % phases else 0), 1) for i in range(phases))


def _overrides(strategy: str, **extra) -> list[str]:
    return [f"transfer.strategy={strategy}"] + [f"{key}={value!r}" for key, value in extra.items()]


# the probes fit a head on cached features (`linear_probe`); the rest train runs of their own
PROBES = tuple(name for name in COST if candidate_overrides(name, (), 1)[0] == "transfer.strategy=linear_probe")
FINETUNES = tuple(name for name in COST if name not in PROBES)


def decide(measured: dict, epochs: int = 10) -> dict:
    """Places measurements from `jaxtl.advice.measure.measure` in the matrix; returns the advice: the signals'
    votes, the cell, its candidates in order, the first one's strategy and config overrides, and the reasons."""
    size_class, size_reason = size_tier(measured["size"])
    calibrated = measured["model"] in THRESHOLDS
    thresholds = THRESHOLDS[measured["model"] if calibrated else DEFAULT_THRESHOLDS]
    probe = {tuple(p["layers"]): p for p in measured["layer_probe"]}
    last = probe[(PRE_LOGITS,)]
    with_earlier = [p for layers, p in probe.items() if layers != (PRE_LOGITS,) and PRE_LOGITS in layers]
    best_earlier = max(with_earlier, key=lambda p: (score_of(p), -p["val_loss"]))
    best_alone = max((p for layers, p in probe.items() if len(layers) == 1 and layers != (PRE_LOGITS,)),
                     key=score_of)
    gain = score_of(best_earlier) - score_of(last)
    words = score_words([last])

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
                f"{words.removeprefix('val ')} by {gain:+.3f} ({score_of(last):.3f} -> "
                f"{score_of(best_earlier):.3f}); {best_alone['layers'][0]} alone {score_of(best_alone):.3f}"}
    votes, count = sum(s["similar"] for s in signals.values()), len(signals)
    tie = 2 * votes == count
    decider = signals.get("batchnorm_shift") or signals.get("head_confidence") or signals["layer_probe"]
    similarity = "similar" if (decider["similar"] if tie else 2 * votes > count) else "different"
    cell = (size_class, similarity)

    reasons = [size_reason]
    reasons += [f"{'similar' if s['similar'] else 'different'}: {s['says']}" for s in signals.values()]
    reasons.append(f"{votes} of {count} signals say ImageNet-like: {similarity}"
                   + (" (a tie, decided by the BatchNorm shift)" if tie else ""))
    if not calibrated:
        reasons.append(f"the thresholds were calibrated for {', '.join(THRESHOLDS)}; {measured['model']} uses "
                       f"{DEFAULT_THRESHOLDS}'s, so read the measured values as well as the votes")
    reasons.append({
        "small": "few images: the pretrained features already separate them and fine-tuning millions of "
                 "parameters would overfit; train a linear head on cached features",
        "medium": "enough images to adapt the top of the network, not all of it at once: fine-tune the last "
                  "stages (or unfreeze them gradually); the generic early stages stay frozen",
        "large": "plenty of images: adapting every layer pays, starting from the pretrained weights at a low LR",
    }[size_class] + ("; unlike ImageNet, so earlier, more generic layers matter more" if similarity == "different"
                     else ""))
    earlier = tuple(best_earlier["layers"])
    candidates = []
    for name in ORDER[cell]:
        candidate = {"name": name, "description": DESCRIPTIONS[name],
                     "overrides": candidate_overrides(name, earlier, epochs)}
        if name in PROBES:
            candidate["layers"] = list(earlier if name == "probe_earlier" else (PRE_LOGITS,))
        candidates.append(candidate)
    advice = {"size": size_class, "similarity": similarity, "cell": CELLS[cell], "signals": signals,
              "candidates": candidates, "reasons": reasons, "measured": measured}
    return recommend(advice, candidates[0]["name"])


def score_of(row: dict) -> float | None:
    """A probe's or trial's val score: its mean AP for multi-label data (`val_map`), else its accuracy."""
    return row.get("val_map", row.get("val_accuracy"))


def score_words(rows: list[dict]) -> str:
    """What the rows' scores are, in words."""
    return "val mAP" if any("val_map" in row for row in rows) else "val accuracy"


def recommend(advice: dict, name: str) -> dict:
    """`advice` recommending its candidate `name`: `chosen`, and that candidate's strategy and config overrides."""
    candidate = next(c for c in advice["candidates"] if c["name"] == name)
    return advice | {"chosen": name, "strategy": candidate["overrides"][0].split("=", 1)[1],
                     "overrides": candidate["overrides"]}


def format_advice(advice: dict, dataset: str) -> str:
    """The matrix with the dataset's cell marked, the signals, the candidates (and the trials' table, if run),
    the recommendation and its reasons, as text."""
    m = advice["measured"]
    size = m["size"]
    chosen = (advice["size"], advice["similarity"])
    mark = {cell: ("[x] " if cell == chosen else "[ ] ") + text for cell, text in CELLS.items()}
    width = max(len(v) for v in mark.values()) + 2
    limits = {"small": f"< {MEDIUM_TOTAL:,} or < {MEDIUM_PER_CLASS}/class",
              "medium": f"< {LARGE_TOTAL:,} or < {LARGE_PER_CLASS:,}/class",
              "large": f">= {LARGE_TOTAL:,} and >= {LARGE_PER_CLASS:,}/class"}
    labels = {tier: f"{tier} ({limits[tier]})" for tier in SIZES}
    side = max(map(len, labels.values())) + 2
    lines = [
        f"dataset  {dataset}: {size['classes']} classes, {size['train_images']} train / {size['val_images']} val "
        f"images, median {size['median_train_per_class']:g} train images per class",
        f"model    {m['model']} ({m['weights']}), {m['input_size']}x{m['input_size']}; measured in {m['seconds']} s",
        *(["", *format_models(advice["models"])] if advice.get("models") else []),
        "",
        "similarity to ImageNet, measured with the pretrained model:",
        *(f"  {'similar  ' if s['similar'] else 'different'}  {name:16} {s['says']}"
          for name, s in advice["signals"].items()),
        "",
        f"{'':{side}}{'similar to ImageNet':{width}}different from ImageNet",
        *(f"{labels[tier]:{side}}{mark[(tier, 'similar')]:{width}}{mark[(tier, 'different')]}"
          for tier in SIZES),
        "",
        "candidates, in the cell's order: " + ", ".join(c["name"] for c in advice["candidates"]),
    ]
    if advice.get("trials"):
        lines += ["", "trials (successive halving: each candidate's own run on every training image, paused after "
                  "each rung; the better half go on):",
                  *format_trials(advice["trials"])]
    lines += [
        "",
        f"recommendation: {DESCRIPTIONS[advice['chosen']]} (transfer.strategy={advice['strategy']})",
        "  python run.py train --config CONFIG " + " ".join(f'"--config.{o}"' for o in advice["overrides"]),
        "  (or `train --strategy auto`, which measures, tries the candidates within its budget and trains the "
        "winner)",
        "reasons:",
        *(f"  - {reason}" for reason in advice["reasons"]),
    ]
    return "\n".join(lines)


def format_models(models: dict) -> list[str]:
    """The backbones `transfer.auto_models` ranked (`jaxtl.advice.models`), best first, as text lines."""
    lines = [f"backbones, by the {models['k']}-nearest-neighbour accuracy on val of their {models['layer']} features:"]
    for i, row in enumerate(models["rows"]):
        lines.append(f"  {'[x]' if i == 0 else '[ ]'} {row['model']:20} {str(row['weights']):36} "
                     f"{row['input_size']:4d} px {row['knn_val_accuracy']:8.4f} {row['seconds']:7.1f} s")
    return [*lines, f"  {models['why']}"]


def format_trials(trials: dict) -> list[str]:
    rows = [f"  {'candidate':<18}{score_words(trials['rows']):>13}{'steps':>7}{'seconds':>9}  note"]
    for row in trials["rows"]:
        accuracy = "-" if score_of(row) is None else f"{score_of(row):.3f}"
        rows.append(f"  {row['name']:<18}{accuracy:>13}{row.get('steps', 0):>7}{row.get('seconds', 0):>9.1f}  "
                    f"{row.get('note', '')}")
    rows.append(f"  {trials['verdict']}")
    return rows
