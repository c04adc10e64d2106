"""Differentiable siamese augmentation (DSA; Zhao & Bilen, "Dataset Condensation with Differentiable Siamese
Augmentation", ICML 2021) as torch ops on normalised float batches.

Distribution matching (:mod:`kdpipe.ml.data.condense`) applies one transform with the same parameters to a class's real
batch and its synthetic images (siamese), and the gradient flows through it to the synthetic pixels. Models trained
on a condensed set see the same family of transforms, with parameters drawn per image (``data.augment.dsa``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")  # DSA's strategy color_crop_cutout_flip_scale_rotate


class DSA:
    """DSA's transforms as torch ops, differentiable w.r.t. the images (DSA's defaults: scale 1.2, rotate 15°,
    crop/translate 1/8 of the size, cutout 1/2, flip 0.5, brightness 1, saturation 2, contrast 0.5).

    :meth:`sample` draws one transform (one of :data:`OPS`, as DSA's single mode does) and its parameters for
    ``n`` images; ``n = 1`` is the siamese case: the same parameters for every image of every batch they are
    applied to (the real batch and the synthetic one). :meth:`apply` replays them on any batch.
    """

    def __init__(
        self,
        scale: float = 1.2,
        rotate: float = 15.0,
        crop: float = 0.125,
        cutout: float = 0.5,
        flip: float = 0.5,
        brightness: float = 1.0,
        saturation: float = 2.0,
        contrast: float = 0.5,
        ops: tuple[str, ...] = OPS,
    ) -> None:
        self.scale, self.rotate, self.crop, self.cutout, self.flip = scale, rotate, crop, cutout, flip
        self.brightness, self.saturation, self.contrast, self.ops = brightness, saturation, contrast, ops

    def sample(self, n: int, shape: tuple[int, ...], g: torch.Generator) -> dict[str, Any]:
        """One transform and its parameters for ``n`` images of ``shape`` (C, H, W)."""
        op = self.ops[int(torch.randint(len(self.ops), (1,), generator=g))]
        h, w = shape[-2:]
        u = lambda: torch.rand(n, generator=g)  # noqa: E731
        if op == "color":
            return {"op": op, "b": (u() - 0.5) * self.brightness, "s": u() * self.saturation, "c": u() + self.contrast}
        if op == "crop":
            sy, sx = int(h * self.crop + 0.5), int(w * self.crop + 0.5)
            return {"op": op, "dy": torch.randint(-sy, sy + 1, (n,), generator=g),
                    "dx": torch.randint(-sx, sx + 1, (n,), generator=g)}  # fmt: skip
        if op == "cutout":
            ch, cw = int(h * self.cutout + 0.5), int(w * self.cutout + 0.5)
            return {"op": op, "size": (ch, cw), "cy": torch.randint(0, h + (1 - ch % 2), (n,), generator=g),
                    "cx": torch.randint(0, w + (1 - cw % 2), (n,), generator=g)}  # fmt: skip
        if op == "flip":
            return {"op": op, "flip": u() < self.flip}
        if op == "scale":
            lo = 1 / self.scale
            return {"op": op, "sy": u() * (self.scale - lo) + lo, "sx": u() * (self.scale - lo) + lo}
        return {"op": op, "angle": (u() - 0.5) * 2 * self.rotate / 180 * math.pi}

    def apply(self, x: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
        """``x`` (B, C, H, W, float) transformed by parameters from :meth:`sample` (of B images, or of one)."""
        op, b = p["op"], len(x)
        col = lambda t: t.to(x.device, x.dtype).view(-1, 1, 1, 1)  # noqa: E731
        if op == "color":
            x = x + col(p["b"])
            mean = x.mean(1, keepdim=True)
            x = (x - mean) * col(p["s"]) + mean
            mean = x.mean((1, 2, 3), keepdim=True)
            return (x - mean) * col(p["c"]) + mean
        if op == "flip":
            return torch.where(col(p["flip"]).bool(), x.flip(3), x)
        if op == "crop":  # translate, filling with zeros
            _, _, h, w = x.shape
            sy, sx = int(p["dy"].abs().max()), int(p["dx"].abs().max())
            padded = F.pad(x, (sx, sx, sy, sy))
            rows = (sy - p["dy"].to(x.device))[:, None] + torch.arange(h, device=x.device)
            cols = (sx - p["dx"].to(x.device))[:, None] + torch.arange(w, device=x.device)
            bi = torch.arange(b, device=x.device)[:, None, None, None]
            ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
            return padded[bi, ci, rows.expand(b, h)[:, None, :, None], cols.expand(b, w)[:, None, None, :]]
        if op == "cutout":
            _, _, h, w = x.shape
            ch, cw = p["size"]
            ys = torch.arange(h, device=x.device)[None] - (p["cy"].to(x.device)[:, None] - ch // 2)
            xs = torch.arange(w, device=x.device)[None] - (p["cx"].to(x.device)[:, None] - cw // 2)
            hole = ((ys >= 0) & (ys < ch))[:, :, None] & ((xs >= 0) & (xs < cw))[:, None, :]
            return x * (~hole).to(x.dtype)[:, None]
        if op == "scale":
            zero = torch.zeros_like(p["sx"])
            theta = torch.stack([torch.stack([p["sx"], zero, zero], 1), torch.stack([zero, p["sy"], zero], 1)], 1)
        else:
            cos, sin, zero = p["angle"].cos(), p["angle"].sin(), torch.zeros_like(p["angle"])
            theta = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)
        theta = theta.to(x.device, x.dtype).expand(b, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, align_corners=True)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Independent random parameters per image (how a model is trained on a condensed set)."""
        return self.apply(x, self.sample(len(x), tuple(x.shape[1:]), g))
