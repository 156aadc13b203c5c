"""Per-class coverage of generated digits, judged by the digits classifier."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

NUM_CLASSES = 10


@torch.no_grad()
def class_coverage(
    samples: torch.Tensor,
    classifier: nn.Module | None = None,
    confidence: float = 0.9,
    batch_size: int = 512,
) -> dict[str, object]:
    """Which digits a batch of samples (N, C, H, W) in [0, 1] covers, and how evenly.

    Returns ``num_samples``; ``counts`` (10 ints: confidently classified samples per class, i.e.
    top softmax probability >= ``confidence``); ``counts_all`` (argmax of every sample);
    ``histogram`` (``counts`` normalised, zeros if none is confident); ``confident_fraction``;
    ``classes_present`` (classes with at least one confident sample); ``entropy`` (nats, of
    ``histogram``) and ``balance`` (entropy / log 10: 1 for a uniform spread, 0 for one class).
    ``classifier`` defaults to ``get_digits_classifier()``.
    """
    if classifier is None:
        from diffusion_lab.metrics.digits_classifier import get_digits_classifier

        classifier = get_digits_classifier()
    if samples.ndim != 4 or len(samples) == 0:
        raise ValueError(f"expected a non-empty batch (N, C, H, W), got {tuple(samples.shape)}")
    device = next(iter(classifier.state_dict().values()), torch.empty(0)).device
    probs = torch.cat(
        [classifier(b.to(device).float()).softmax(dim=1).cpu() for b in samples.split(batch_size)]
    )
    top, label = probs.max(dim=1)
    sure = top >= confidence
    counts = torch.bincount(label[sure], minlength=NUM_CLASSES)
    counts_all = torch.bincount(label, minlength=NUM_CLASSES)
    total = int(counts.sum())
    histogram = counts.double() / max(total, 1)
    nonzero = histogram[histogram > 0]
    entropy = float(-(nonzero * nonzero.log()).sum())
    return {
        "num_samples": len(samples),
        "confidence": confidence,
        "counts": counts.tolist(),
        "counts_all": counts_all.tolist(),
        "histogram": histogram.tolist(),
        "confident_fraction": float(sure.double().mean()),
        "classes_present": int((counts > 0).sum()),
        "entropy": entropy,
        "balance": entropy / math.log(NUM_CLASSES),
    }


def plot_class_histogram(result: dict[str, object], path: str | Path) -> Path:
    """Bar chart of ``result["counts"]`` (and all argmax counts) from ``class_coverage``, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(5, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    classes = range(NUM_CLASSES)
    ax.bar(classes, result["counts_all"], color="lightgray", label="all (argmax)")
    ax.bar(classes, result["counts"], color="tab:blue", label=f"p >= {result['confidence']}")
    ax.set_xticks(list(classes))
    ax.set_xlabel("digit")
    ax.set_ylabel("samples")
    ax.set_title(
        f"N={result['num_samples']}, confident {result['confident_fraction']:.0%}, "
        f"classes {result['classes_present']}/10, balance {result['balance']:.2f}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
