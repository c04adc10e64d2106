"""Check that an exported ONNX file computes what the torch model computes."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from kdpipe.errors import StageError


def check_parity(
    model: nn.Module,
    onnx_path: Path,
    images: torch.Tensor,
    batch_size: int = 64,
    providers: list[str] | None = None,
) -> dict:
    """Run ``model`` and the ONNX file on the same images and compare their logits.

    Args:
        model: The torch network the file was exported from; run in eval mode, fp32, without grad.
        onnx_path: The exported file.
        images: A batch (N, ...) of inputs.
        batch_size: How many images go through each forward pass.
        providers: onnxruntime execution providers; CPU by default.

    Returns:
        ``{"samples", "max_abs_diff", "mean_abs_diff", "top1_agreement"}``; the mean is over every logit.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    session = ort.InferenceSession(str(onnx_path), providers=providers or ["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    params = list(model.parameters())
    if any(p.dtype != torch.float32 for p in params if p.is_floating_point()):
        model = copy.deepcopy(model).float()  # compare in fp32 without changing the caller's model
    model.eval()
    device = params[0].device if params else torch.device("cpu")

    n = int(images.shape[0])
    max_diff, diff_sum, diff_count, agree = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = images[start : start + batch_size].to(dtype=torch.float32)
            expected = model(batch.to(device)).float().cpu().numpy()
            actual = session.run(None, {input_name: batch.cpu().numpy()})[0].astype(np.float32)
            diff = np.abs(expected.astype(np.float64) - actual.astype(np.float64))
            if diff.size:
                max_diff = max(max_diff, float(diff.max()))
            diff_sum += float(diff.sum())
            diff_count += diff.size
            agree += int((expected.argmax(axis=1) == actual.argmax(axis=1)).sum())

    return {
        "samples": n,
        "max_abs_diff": max_diff,
        "mean_abs_diff": diff_sum / diff_count if diff_count else 0.0,
        "top1_agreement": agree / n if n else 1.0,
    }


def assert_parity(result: dict, max_abs_diff: float, min_top1_agreement: float, what: str) -> None:
    """Raise ``StageError("export", ...)`` if ``result`` misses either threshold.

    The message names both the measured figure and the threshold for the two checks, so a failure can be judged
    without rerunning, e.g. ``student.onnx parity: max abs diff 3.2e-03 > tolerance 1.0e-04 (top-1 agreement
    0.9990 ≥ 0.999)``.
    """
    diff = float(result["max_abs_diff"])
    agreement = float(result["top1_agreement"])
    diff_ok = diff <= max_abs_diff
    agree_ok = agreement >= min_top1_agreement
    if diff_ok and agree_ok:
        return
    diff_text = f"max abs diff {diff:.1e} {'≤' if diff_ok else '>'} tolerance {max_abs_diff:.1e}"
    agree_text = f"top-1 agreement {agreement:.4f} {'≥' if agree_ok else '<'} {min_top1_agreement}"
    if diff_ok:
        message = f"{what} parity: {agree_text} ({diff_text})"
    else:
        message = f"{what} parity: {diff_text} ({agree_text})"
    raise StageError("export", f"{message} over {result.get('samples', '?')} samples")
