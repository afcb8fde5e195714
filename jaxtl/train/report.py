"""What a run leaves in its workdir: metrics.jsonl, TensorBoard events, summary.json, PNG plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxtl.core.atomic import atomic_path, json_text, write_json_atomic, writes_into
from jaxtl.core.events import ScalarEvents


class MetricsLog:
    """Appends one JSON object per epoch to `metrics.jsonl` and mirrors scalars to TensorBoard.

    It starts from the checkpoint's `history`: lines a killed run wrote after its last checkpoint are dropped,
    so a resumed run's file has each epoch once.
    """

    def __init__(self, workdir: Path, history: list[dict], enabled: bool = True):
        self.path = workdir / "metrics.jsonl"
        self.enabled = enabled
        self._writer = None
        if enabled:
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(json_text(record, indent=None) + "\n" for record in history))
            with writes_into(workdir):
                self._writer = ScalarEvents(workdir / "tensorboard")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with writes_into(self.path.parent):
            with open(self.path, "a") as f:
                f.write(json_text(record, indent=None) + "\n")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self._writer.add_scalar(key, value, record["step"])
            self._writer.flush()

    def close(self) -> None:
        if self._writer:
            self._writer.close()


def plot_curves(history: list[dict], path: Path, x: str = "epoch") -> None:
    """Train/val loss and accuracy against `x`: epochs, or (`x="l2"`, log scale) the L2 strengths of a search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h[x] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", ax_loss), ("accuracy", ax_acc)):
        for split in ("train", "val"):
            values = [h.get(f"{split}_{key}") for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", label=split)
        ax.set_xlabel(x)
        if x == "l2":
            ax.set_xscale("log")
        ax.set_title(key)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: np.ndarray, class_names: tuple[str, ...], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), max(4, 0.5 * n + 2)))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(workdir: Path, summary: dict, history: list[dict], class_names: tuple[str, ...]) -> None:
    """`summary.json`, the learning curves (or the L2 search) and the confusion matrix of the split that judges the
    kept model (test if there is one, else val)."""
    write_json_atomic(workdir / "summary.json", summary)
    if history and "epoch" in history[0]:
        plot_curves(history, workdir / "learning_curves.png")
    elif history and "l2" in history[0]:
        plot_curves(history, workdir / "l2_search.png", x="l2")
    key, title = ("best_checkpoint_test", "test, best checkpoint") if "best_checkpoint_test" in summary else (
        "final_val", "val, final model")
    if key in summary and "confusion" in summary[key]:  # multi-label runs have none: the report draws PR curves
        plot_confusion(np.asarray(summary[key]["confusion"]), class_names, workdir / "confusion_matrix.png",
                       f"confusion matrix ({title})")
