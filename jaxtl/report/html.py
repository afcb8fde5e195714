"""`WORKDIR/report.html`: one self-contained page a person reads after a run (pictures embedded as PNG data, no
server, opens from disk), built from what the run left (`config.json`, `summary.json`, `metrics.jsonl`,
`advice.json`) and its kept model:

- the run at a glance (model, weights, strategy, data, accuracies) and the resolved config;
- `auto`'s advice and trial table, when it ran;
- loss and accuracy curves; the confusion matrix and per-class accuracy of the split that judges the kept model;
- the most confidently wrong val images (fastai's top losses) with their true and predicted labels;
- Grad-CAM maps (`jaxtl.report.cam`) of a few val images on the backbone's last stage.

Every number shown comes from `summary.json` (the predictions behind the pictures are the kept model's own, the
same model that summary scored); `run.py report --workdir W` rebuilds the page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path

import numpy as np

from jaxtl.advice.matrix import format_advice
from jaxtl.config import load_resolved
from jaxtl.core.atomic import atomic_path, json_text, read_json, read_json_lines
from jaxtl.core.compiler import jit
from jaxtl.core.errors import MissingFileError, RunFileError
from jaxtl.core.processes import is_main
from jaxtl.data.preprocess import eval_pixels, normalize
from jaxtl.report.cam import grad_cam, last_map, overlay
from jaxtl.train import plan as plans
from jaxtl.train.restore import load_trained

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
MAX_SCORED = 1000  # val images the kept model scores for the wrong-and-confident gallery (a seeded subset past it)
WRONG_SHOWN = 12
CAM_SHOWN = 6

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:2em;
border-bottom:1px solid #ddd;padding-bottom:.2em}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;font-size:.9em}th{background:#f5f5f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;
font-size:.8em}.grid{display:flex;flex-wrap:wrap;gap:12px}.card{width:160px;font-size:.8em;overflow-wrap:anywhere}
.card img{width:160px;height:160px;image-rendering:auto;border-radius:4px}.wrong{color:#b00}.muted{color:#777}
.figures img{max-width:100%}
"""


def _png(figure_or_array) -> str:
    """A `data:` URI of a matplotlib figure or a uint8 image array, as PNG."""
    buffer = io.BytesIO()
    if isinstance(figure_or_array, np.ndarray):
        from PIL import Image

        Image.fromarray(figure_or_array).save(buffer, format="PNG")
    else:
        import matplotlib.pyplot as plt

        figure_or_array.savefig(buffer, format="png", dpi=90)
        plt.close(figure_or_array)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _curves(history: list[dict]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if not history or "epoch" not in history[0]:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, ax in zip(("loss", "accuracy"), axes):
        for split in ("train", "val"):
            points = [(h["epoch"], h[f"{split}_{key}"]) for h in history if h.get(f"{split}_{key}") is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _png(fig)


def _confusion(confusion: np.ndarray, names: tuple[str, ...], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    side = min(max(4.0, 0.45 * n + 2), 14.0)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), names, rotation=90 if n > 4 else 0, fontsize=8 if n > 20 else 10)
    ax.set_yticks(range(n), names, fontsize=8 if n > 20 else 10)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        top = confusion.max() or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if confusion[i, j] > top / 2 else "black")
    fig.tight_layout()
    return _png(fig)


def _pr_curves(curves: list[dict], names: tuple[str, ...], ap: list, title: str) -> str:
    """One precision-recall picture per label (up to 6 a row), its AP in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    columns = min(n, 6)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.3 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        curve = curves[i]
        ax.plot([0.0, *curve["recall"]], [1.0, *curve["precision"]], drawstyle="steps-post")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{names[i]}: AP {ap[i]:.3f}" if ap[i] is not None else f"{names[i]}: no positives",
                     fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"precision (y) against recall (x), {title}", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _table(headers: list[str], rows: list[list], keys: list[str | None] | None = None) -> str:
    """An HTML table; numbers right-aligned; the last cell of a row whose key is given carries the key and its
    exact value (`data-key`, `data-value`: what tests compare with summary.json)."""
    def cell(value, key):
        attr = f' data-key="{html.escape(key)}" data-value="{value!r}"' if key else ""
        if isinstance(value, float):
            return f'<td class="num"{attr}>{value:.4g}</td>'
        if isinstance(value, int):
            return f'<td class="num"{attr}>{value:,}</td>'
        return f"<td{attr}>{html.escape(str(value))}</td>"

    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>" if any(headers) else ""
    body = "".join("<tr>" + "".join(cell(v, (keys[r] if keys else None) if c == len(row) - 1 else None)
                                    for c, v in enumerate(row)) + "</tr>" for r, row in enumerate(rows))
    return f"<table>{head}{body}</table>"


def _judged(summary: dict) -> tuple[str, str, dict] | None:
    """The split that judges the kept model: test (best checkpoint) if the run had one, else val (final)."""
    if "best_checkpoint_test" in summary:
        return "best_checkpoint_test", "test, kept model (best checkpoint)", summary["best_checkpoint_test"]
    if "final_val" in summary:
        return "final_val", "val, final model", summary["final_val"]
    return None


def _scored_val(workdir: Path, seed: int):
    """The kept model's probabilities (multi-label: each label's sigmoid) on (up to `MAX_SCORED` of) the val split,
    and a function giving the Grad-CAM layer's maps of chosen images with the same compiled forward pass:
    `(model, variables, prep, split, index, pixels, probs, layer, maps_of)`; None without a val split."""
    import jax

    config = load_resolved(workdir)
    multi_label = plans.multi_label_data(config)
    dataset = plans.data_source(config).load()
    if "val" not in dataset.splits:
        return None
    model, variables, prep, _ = load_trained(workdir)
    split = dataset.splits["val"]
    index = np.arange(len(split))
    if len(index) > MAX_SCORED:
        index = np.sort(np.random.default_rng(seed).choice(index, MAX_SCORED, replace=False))
    batch, size = 32, prep.input_size
    probe = jax.numpy.zeros((1, size, size, 3))
    layer = last_map(model.backbone, jax.eval_shape(lambda x: model.apply(variables, x, train=False), probe)[1])

    @jit
    def forward(v, x):
        logits, features = model.apply(v, normalize(x, prep, jax.numpy), train=False)
        return (jax.nn.sigmoid(logits) if multi_label else jax.nn.softmax(logits, -1)), features[layer]

    def padded(images: np.ndarray) -> np.ndarray:  # one compiled shape
        return np.concatenate([images, np.repeat(images[-1:], batch - len(images), 0)])

    pixels, probs = [], []
    for start in range(0, len(index), batch):
        chunk = np.stack([eval_pixels(split.load(int(i), prep.resize_size), prep, exif=False)  # upright by then
                          for i in index[start : start + batch]])
        probs.append(np.asarray(forward(variables, padded(chunk))[0])[: len(chunk)])
        pixels.append(chunk)

    def maps_of(images: np.ndarray) -> np.ndarray:
        return np.asarray(forward(variables, padded(images))[1])[: len(images)]

    return model, variables, prep, split, index, np.concatenate(pixels), np.concatenate(probs), layer, maps_of


def _gallery(cards: list[tuple[str, str]]) -> str:
    return '<div class="grid">' + "".join(f'<div class="card"><img src="{src}" alt="">{caption}</div>'
                                          for src, caption in cards) + "</div>"


def build_report(workdir: str | Path, summary: dict | None = None, images: bool = True) -> Path:
    """Writes `workdir/report.html` (atomically, process 0) and returns its path. `summary`: the run's, as `train`
    returned it (default: `summary.json`). `images=False` leaves out the parts that need the kept model (the
    wrong-and-confident gallery and the class-activation maps). In a multi-process job every process calls it:
    restoring the kept model is collective."""
    import jax.numpy as jnp

    workdir = Path(workdir)
    if summary is None:
        if not (workdir / "summary.json").is_file():
            raise MissingFileError(f"no summary.json in {workdir}: the report is written when `train` finishes; run "
                                   f"(or resume) `train` with --workdir {workdir}")
        fix = (f"`train` writes it again from the run's checkpoints: run it with --workdir {workdir} (a finished "
               "run is not trained again)")
        summary = read_json(workdir / "summary.json", fix)
        missing = [key for key in ("model", "strategy", "classes", "input_size") if key not in summary]
        if missing:
            raise RunFileError(f"{workdir / 'summary.json'} is damaged (no {', '.join(missing)}); {fix}")
    summary = json.loads(json_text(summary))  # as summary.json holds it (plain JSON values)
    has_config = (workdir / "config.json").is_file()
    config_text = (workdir / "config.json").read_text(errors="replace") if has_config else "{}"
    history, damaged = read_json_lines(workdir / "metrics.jsonl") if (workdir / "metrics.jsonl").is_file() else ([], [])
    if damaged:
        log.warning("%s: line%s %s damaged, left out of the learning curves; `train` with --workdir %s writes the "
                    "file again from the latest checkpoint", workdir / "metrics.jsonl", "s" * (len(damaged) > 1),
                    ", ".join(map(str, damaged[:10])), workdir)
    names = tuple(summary["classes"])
    parts = [f"<h1>{html.escape(summary['model'])}: {html.escape(summary['strategy'])} on "
             f"{len(names)} classes</h1><p class='muted'>{html.escape(str(workdir))}</p>"]  # as given

    glance = [("model", summary["model"], None), ("weights", summary.get("weights") or "random init", None),
              ("strategy", summary["strategy"], None), ("trainer", summary.get("trainer", ""), None),
              ("input size", summary["input_size"], None), ("devices", summary.get("devices", 1), None)]
    glance += [(f"{split} images", count, f"splits.{split}") for split, count in summary.get("splits", {}).items()]
    for key in ("test_map", "best_val_map", "final_val_map", "test_accuracy", "best_val_accuracy",
                "final_val_accuracy", "best_epoch", "epochs",
                "train_seconds", "trainable_params", "optimizer_state_bytes"):
        if summary.get(key) is not None:
            glance.append((key.replace("_", " "), summary[key], key))
    parts.append("<h2>The run</h2>" + _table(["", ""], [[k, v] for k, v, _ in glance], [key for *_, key in glance]))

    advice_path = workdir / "advice.json"
    if advice_path.is_file():
        advice = read_json(advice_path, "it is what `auto` measured and chose; restore it from a copy, or train in a "
                                        "new --workdir")
        data = (load_resolved(workdir).data.path if has_config else "") or "the run's data"
        parts.append("<h2>Advice (auto)</h2><pre>" + html.escape(format_advice(advice, data)) + "</pre>")
        rows = (advice.get("trials") or {}).get("rows") or []
        if rows:
            columns = [c for c in ("name", "val_accuracy", "val_map", "images", "steps", "seconds", "note")
                       if any(c in r for r in rows)]
            parts.append("<h3>Trials</h3>" + _table(columns, [[r.get(c, "") for c in columns] for r in rows]))

    curves = _curves(history)
    if curves:
        parts.append(f'<h2>Learning curves</h2><div class="figures"><img src="{curves}" alt="learning curves"></div>')

    judged = _judged(summary)
    if judged and "map" in judged[2]:  # multi-label: precision-recall per label, AP, F1 at the run's thresholds
        key, title, metrics = judged
        parts.append(f"<h2>Precision and recall per label ({html.escape(title)})</h2><div class='figures'><img src="
                     f"'{_pr_curves(metrics['pr_curves'], names, metrics['per_class_ap'], title)}' alt='PR curves'>"
                     f"</div><p>micro F1 {metrics['micro_f1']:.4f}, macro F1 {metrics['macro_f1']:.4f} at the "
                     "thresholds below (chosen on val, or eval.threshold)</p>")
        ap = [-1.0 if a is None else a for a in metrics["per_class_ap"]]
        rows = [[name, float(summary["thresholds"][i]), float(metrics["per_class_f1"][i]),
                 metrics["per_class_ap"][i] if metrics["per_class_ap"][i] is not None else "no positives"]
                for i, name in enumerate(names)]
        order = np.argsort(ap, kind="stable")
        parts.append(f"<h3>Per-label AP ({html.escape(title)}), worst first</h3>"
                     + _table(["label", "threshold", "F1", "AP"], [rows[i] for i in order],
                              [f"{key}.per_class_ap.{i}" for i in order]))
    elif judged:
        key, title, metrics = judged
        confusion = np.asarray(metrics["confusion"])
        parts.append(f"<h2>Confusion matrix ({html.escape(title)})</h2>"
                     f'<div class="figures"><img src="{_confusion(confusion, names, title)}" alt="confusion"></div>')
        support = confusion.sum(1)
        rows = [[name, int(support[i]), float(metrics["per_class_accuracy"][i])] for i, name in enumerate(names)]
        order = np.argsort([r[2] for r in rows], kind="stable")
        parts.append(f"<h3>Per-class accuracy ({html.escape(title)}), worst first</h3>"
                     + _table(["class", "images", "accuracy"], [rows[i] for i in order],
                              [f"{key}.per_class_accuracy.{i}" for i in order]))

    if images and summary.get("multi_label"):
        scored = _scored_val(workdir, seed=0)
        if scored is not None:
            parts += _multi_label_galleries(scored, names, np.asarray(summary["thresholds"]))
    elif images:
        scored = _scored_val(workdir, seed=0)
        if scored is not None:
            model, variables, prep, split, index, pixels, probs, layer, maps_of = scored
            labels, predicted = split.labels[index], probs.argmax(1)
            wrong = np.flatnonzero(predicted != labels)
            wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:WRONG_SHOWN]
            shown = f" (a seeded {len(index)} of {len(split)})" if len(index) < len(split) else ""
            cards = [(_png(pixels[i]), f"<div class='wrong'>predicted {html.escape(names[predicted[i]])} "
                      f"({probs[i, predicted[i]]:.2f})</div><div>true {html.escape(names[labels[i]])}</div>"
                      f"<div class='muted'>{html.escape(Path(str(split.files[index[i]])).name)}</div>") for i in wrong]
            parts.append(f"<h2>Most confidently wrong val images{shown}</h2>"
                         + (_gallery(cards) if cards else "<p>No val image is misclassified.</p>"))

            chosen = _cam_examples(labels, predicted, probs)
            cams = grad_cam(model, variables, normalize(jnp.asarray(pixels[chosen]), prep, jnp), predicted[chosen],
                            layer, maps=jnp.asarray(maps_of(pixels[chosen])))
            cards = [(_png(overlay(pixels[i], cam)), f"<div>{'' if predicted[i] == labels[i] else 'wrong: '}"
                      f"{html.escape(names[predicted[i]])} ({probs[i, predicted[i]]:.2f})</div>"
                      f"<div class='muted'>true {html.escape(names[labels[i]])}</div>") for i, cam in zip(chosen, cams)]
            parts.append("<h2>Where the model looks (Grad-CAM on the last stage, for the predicted class)</h2>"
                         + _gallery(cards))

    parts.append("<h2>Resolved config</h2><details><summary>config.json</summary><pre>"
                 + html.escape(config_text, quote=False) + "</pre></details>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>jaxtl report: {html.escape(summary['model'])} "
            f"{html.escape(summary['strategy'])}</title><style>{_STYLE}</style></head><body>{''.join(parts)}"
            "</body></html>")
    path = workdir / REPORT_FILE
    if is_main():
        with atomic_path(path) as tmp:
            tmp.write_text(page, encoding="utf-8")
    return path


def _multi_label_galleries(scored, names: tuple[str, ...], thresholds: np.ndarray) -> list[str]:
    """A multi-label run's val images whose labels the kept model gets wrong at its thresholds, the most confident
    mistake first, and Grad-CAM of the first few images' top label."""
    import jax.numpy as jnp

    model, variables, prep, split, index, pixels, probs, layer, maps_of = scored
    truth, predicted = split.labels[index] > 0, probs >= thresholds
    wrong = truth != predicted
    confidence = np.where(wrong, np.where(predicted, probs, 1 - probs), 0).max(1)
    order = np.flatnonzero(wrong.any(1))
    order = order[np.argsort(-confidence[order], kind="stable")][:WRONG_SHOWN]

    def listed(row: np.ndarray, i: int) -> str:
        return ", ".join(f"{html.escape(names[c])} ({probs[i, c]:.2f})" for c in np.flatnonzero(row)) or "none"

    shown = f" (a seeded {len(index)} of {len(split)})" if len(index) < len(split) else ""
    cards = [(_png(pixels[i]), f"<div class='wrong'>predicted {listed(predicted[i], i)}</div><div>true "
              f"{listed(truth[i], i)}</div><div class='muted'>{html.escape(Path(str(split.files[index[i]])).name)}"
              "</div>") for i in order]
    parts = [f"<h2>Val images with wrong labels, most confident first{shown}</h2>"
             + (_gallery(cards) if cards else "<p>Every val image gets its labels right.</p>")]
    chosen = np.arange(min(CAM_SHOWN, len(index)))
    top = probs[chosen].argmax(1)
    cams = grad_cam(model, variables, normalize(jnp.asarray(pixels[chosen]), prep, jnp), top, layer,
                    maps=jnp.asarray(maps_of(pixels[chosen])))
    cards = [(_png(overlay(pixels[i], cam)), f"<div>{html.escape(names[top[i]])} ({probs[i, top[i]]:.2f})</div>"
              f"<div class='muted'>true {listed(truth[i], i)}</div>") for i, cam in zip(chosen, cams)]
    return parts + ["<h2>Where the model looks (Grad-CAM on the last stage, for the top label)</h2>"
                    + _gallery(cards)]


def _cam_examples(labels: np.ndarray, predicted: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Up to `CAM_SHOWN` val images: the most confident right one of each class in turn, then wrong ones."""
    chosen: list[int] = []
    for c in np.unique(labels):
        right = np.flatnonzero((labels == c) & (predicted == c))
        if len(right):
            chosen.append(int(right[np.argmax(probs[right, c])]))
        if len(chosen) == CAM_SHOWN - 1:
            break
    wrong = np.flatnonzero(predicted != labels)
    chosen += [int(i) for i in wrong[: CAM_SHOWN - len(chosen)]]
    return np.asarray(chosen[:CAM_SHOWN], np.int64)
