"""What the reports say about the student's training images (report.json ``training_data``, from the distill stage).

A student distilled with ``distill.data: synthetic`` never saw a training image: the Markdown report, the HTML
report and the model card say so, with how many real training images were used (0), which generator terms were
used (and which were left out, and why), and a warning when the generator collapsed onto few classes; the HTML
report also shows a grid of generated images per class (:func:`grid_figure`). Real-data runs add nothing here.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

TERM_NAMES = {
    "bn": "batch-norm statistics (DeepInversion)",
    "ce": "one-hot cross-entropy (DAFL)",
    "entropy": "information entropy (DAFL)",
    "diversity": "mode seeking within a class",
    "adversarial": "adversarial student–teacher discrepancy (DFAD) with an easy-to-hard curriculum",
}


def synthetic(report: dict[str, Any]) -> dict[str, Any] | None:
    """The ``training_data`` block of a data-free run, or None."""
    block = report.get("training_data")
    return block if isinstance(block, dict) and block.get("source") == "synthetic" else None


def statement(report: dict[str, Any]) -> str | None:
    """One sentence for the model card and the reports: the student was trained without the original data."""
    block = synthetic(report)
    if block is None:
        return None
    images = block.get("real_training_images", 0)
    return (
        f"The student was trained without the original data: {images:,} real training images; every training "
        "image was made by a generator trained against the frozen teacher (validation images chose the epoch, test "
        "images measured it)."
    )


def lines(report: dict[str, Any]) -> list[str]:
    """The statement, the generator terms used and left out, how int8 variants were calibrated, and any collapse."""
    block = synthetic(report)
    if block is None:
        return []
    gen = block.get("generator") or {}
    out = [statement(report) or ""]
    used = [f"{t} ({TERM_NAMES.get(t, t)}, weight {(gen.get('weights') or {}).get(t, '?')})" for t in gen.get("terms")
            or []]  # fmt: skip
    if used:
        kind = "conditional" if gen.get("conditional") else "unconditional"
        out.append(f"Generator ({kind}, {gen.get('parameters', 0):,} parameters, {gen.get('steps', 0):,} steps, "
                   f"{gen.get('images', 0):,} images) terms used: {'; '.join(used)}.")  # fmt: skip
    left = gen.get("left_out") or {}
    if left:
        out.append("Terms left out: " + "; ".join(f"{t} ({why})" for t, why in left.items()) + ".")
    calibrated = [
        (name, (m.get("quantization") or {}).get("calibration_samples"))
        for name, m in (report.get("models") or {}).items()
        if isinstance(m, dict) and (m.get("quantization") or {}).get("calibration_samples")
    ]
    if calibrated:
        names = ", ".join(name for name, _ in calibrated)
        out.append(f"Int8 calibration ({names}) used {calibrated[0][1]} generated images, not training images.")
    warning = flag(report)
    if warning:
        out.append(f"⚠ {warning}.")
    return out


def flag(report: dict[str, Any]) -> str | None:
    """The collapse warning, naming the epochs and why, or None."""
    block = synthetic(report)
    collapse = (block or {}).get("collapse") or {}
    if not collapse.get("detected"):
        return None
    epochs = collapse.get("epochs") or []
    where = ", ".join(str(e.get("epoch")) for e in epochs)
    why = epochs[-1].get("reason") if epochs else "few classes"
    return (
        f"The data-free generator looks collapsed in epoch{'s' if len(epochs) > 1 else ''} {where} ({why}): the "
        "student saw few classes' images; check the per-class accuracy and the grid of generated images"
    )


def decode_grid(grid: dict[str, Any]) -> tuple[list[str], list[Any]] | None:
    """The grid's class names and, per class, a uint8 array (n, C, H, W); None when it cannot be read."""
    import numpy as np

    try:
        shape = [int(s) for s in grid["shape"]]
        counts = [int(c) for c in grid["counts"]]
        raw = zlib.decompress(base64.b64decode(grid["data"]))
        images = np.frombuffer(raw, dtype=np.uint8).reshape(sum(counts), *shape)
    except (KeyError, TypeError, ValueError, zlib.error):
        return None
    per_class, start = [], 0
    for c in counts:
        per_class.append(images[start : start + c])
        start += c
    return [str(c) for c in grid.get("classes") or []][: len(counts)], per_class


def grid_figure(report: dict[str, Any]) -> Any | None:
    """Generated images, one row per class (the teacher's prediction), or None when there are none."""
    import matplotlib.pyplot as plt

    block = synthetic(report)
    decoded = decode_grid(((block or {}).get("samples") or {}).get("grid") or {})
    if decoded is None or not any(len(images) for images in decoded[1]):
        return None
    classes, per_class = decoded
    cols = max(1, max(len(images) for images in per_class))
    fig, axes = plt.subplots(len(classes), cols, figsize=(0.9 * cols + 1.6, 0.9 * len(classes) + 0.4), squeeze=False)
    for row, (name, images) in enumerate(zip(classes, per_class, strict=True)):
        for col in range(cols):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if col < len(images):
                image = images[col]
                if image.shape[0] == 1:
                    ax.imshow(image[0], cmap="gray", vmin=0, vmax=255)
                else:
                    ax.imshow(image[:3].transpose(1, 2, 0))
        axes[row][0].set_ylabel(f"{name} ({len(images)})", rotation=0, ha="right", va="center", fontsize=8)
    grid = ((block or {}).get("samples") or {}).get("grid") or {}
    more = grid.get("total_classes", len(classes)) - len(classes)
    title = "Generated images by the teacher's predicted class" + (f" (first {len(classes)} classes)" if more else "")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
