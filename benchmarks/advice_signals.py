"""The advice's similarity signals on the shared data, for README's "Advice signals" table.

    JAXTL_DATA_DIR=../shared/data python benchmarks/advice_signals.py [--models efficientnet_lite0,mobilenet_v2]

For each backbone: `run.py advise` (224x224, val 20% of a folder without split folders) on `hymenoptera_data`
and `sign_language_digits`, and on `imagenet_sample` (1000 ImageNet validation images, one a class: a flat
folder, so no split and no probe) the two model-based signals from the signal functions directly, as the
ImageNet reference. Prints one row per signal, then one JSON line with every measured value.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from jaxtl import commands
from jaxtl.advice.signals import batchnorm_shift, head_confidence
from jaxtl.config import base_config
from jaxtl.core.sharding import make_mesh
from jaxtl.data.split import Split
from jaxtl.features.extract import extract_features
from jaxtl.models.backbone import PRE_LOGITS
from jaxtl.train import plan as plans
from jaxtl.weights.create import create_backbone, create_model, headless, resolve_weights

DATASETS = ("hymenoptera_data", "sign_language_digits")


def reference_signals(data: Path, model: str, batch_size: int) -> dict:
    """Head confidence and BatchNorm shift of every image of the flat folder `data` (no split, no probe)."""
    config = base_config()
    config.model.name, config.model.weights = model, "default"
    files = tuple(sorted(p for p in data.iterdir() if p.suffix.lower() in (".jpeg", ".jpg")))
    split = Split(files, np.arange(len(files)))  # labels unused: the signals read images only
    model_plan = plans.model_plan(config)
    prep = plans.preprocessing(config, model_plan)
    resolved = resolve_weights(model, model_plan.weights)
    head = None
    if resolved.num_classes:
        classifier, variables = create_model(model, resolved)
        (backbone, variables), head = headless(classifier, variables), variables["params"]["head"]
    else:
        backbone, variables = create_backbone(model, resolved)
    mesh = make_mesh()
    confidence = None
    if head is not None:
        features = extract_features(backbone, variables, split, prep, (PRE_LOGITS,), batch_size=batch_size,
                                    mesh=mesh)
        confidence = head_confidence(np.asarray(features[PRE_LOGITS]), head)
    shift = batchnorm_shift(backbone, variables, split, prep, mesh, batch_size)
    return {"images": len(split), "head_confidence": confidence, "batchnorm_shift": shift}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet_lite0,mobilenet_v2")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    root = Path(os.environ.get("JAXTL_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    results = {}
    for model in args.models.split(","):
        results[model] = {"imagenet_sample": reference_signals(root / "imagenet_sample", model, args.batch_size)}
        for name in DATASETS:
            advice, _ = commands.advise(root / name, model, batch_size=args.batch_size, progress=False)
            results[model][name] = advice
        rows = {"head_confidence": "pretrained head, mean top-1 probability",
                "batchnorm_shift": "BatchNorm input shift, KL nats/channel"}
        reference = results[model]["imagenet_sample"]
        for signal, label in rows.items():
            if reference[signal] is None:
                continue
            key = "mean_top1_prob" if signal == "head_confidence" else "mean_kl"
            values = [reference[signal][key]] + [results[model][n]["measured"][signal][key] for n in DATASETS]
            print(f"| {model}: {label} | " + " | ".join(f"{v:.4g}" for v in values) + " |")
        probes = []
        for name in DATASETS:
            says = results[model][name]["signals"]["layer_probe"]["says"]
            probes.append(says[says.index("(", says.index(")")) + 1:says.index(");")])  # "(0.942 -> 0.954)"
        print(f"| {model}: probe val acc, pre-logits -> best with earlier layers | | " + " | ".join(probes) + " |")
        for name in DATASETS:
            advice = results[model][name]
            size = advice["measured"]["size"]
            print(f"| {model} {name}: {size['train_images']} / {size['median_train_per_class']:g}: {advice['size']}, "
                  f"{advice['similarity']} -> {advice['cell']} |")
    print(json.dumps({model: {"imagenet_sample": v["imagenet_sample"]}
                      | {n: {"measured": {k: v[n]["measured"][k] for k in ("head_confidence", "batchnorm_shift",
                                                                            "layer_probe", "size")},
                             "signals": {s: v[n]["signals"][s]["value"] for s in v[n]["signals"]},
                             "verdict": [v[n]["size"], v[n]["similarity"], v[n]["cell"]]} for n in DATASETS}
                      for model, v in results.items()}, default=float))


if __name__ == "__main__":
    main()
