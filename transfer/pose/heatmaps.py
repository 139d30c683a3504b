"""Heatmaps of top-down pose: joint <-> heatmap coordinates, Gaussian targets, and their decoding.

Heatmap pixel ``j`` covers input pixels ``[j * stride, (j + 1) * stride)`` (pixel centres at integers), so a
horizontally flipped heatmap lines up with the flipped input without any shift.
Targets: an unnormalised Gaussian (sigma 2 heatmap pixels) at the joint's sub-pixel position; target
weight 1 for labelled joints (v > 0) whose Gaussian touches the heatmap, else 0.
Decoding: per-joint argmax, then a quarter-pixel step toward the higher neighbour (SimpleBaseline).
UDP (Huang et al. CVPR 2020, ViTPose's COCO setting ``use_udp=True``, ``encoding='UDP'``): heatmap and input
are related by unit length instead (heatmap pixel ``j`` sits at input pixel ``j * (W - 1) / (w - 1)``), and
decoding refines the argmax by one Newton step on the log of the Gaussian-blurred heatmap (DARK; mmpose's
``post_dark_udp`` with ``modulate_kernel=11``). Both conventions line up a mirrored heatmap with a mirrored input.
"""

from __future__ import annotations

import numpy as np
import torch


def to_heatmap_coords(points: np.ndarray, stride: int, *, udp_scale: tuple[float, float] | None = None) -> np.ndarray:
    """Crop pixel coordinates -> heatmap pixel coordinates (both with pixel centres at integers).

    ``udp_scale`` = ((W - 1) / (w - 1), (H - 1) / (h - 1)) switches to UDP's unit-length mapping."""
    if udp_scale is not None:
        return np.asarray(points, dtype=np.float64) / np.asarray(udp_scale)
    return (np.asarray(points, dtype=np.float64) + 0.5) / stride - 0.5


def from_heatmap_coords(points: np.ndarray, stride: int, *, udp_scale: tuple[float, float] | None = None) -> np.ndarray:
    if udp_scale is not None:
        return np.asarray(points, dtype=np.float64) * np.asarray(udp_scale)
    return (np.asarray(points, dtype=np.float64) + 0.5) * stride - 0.5


def udp_scale(img_size: tuple[int, int], stride: int) -> tuple[float, float]:
    """(x, y) input pixels per heatmap pixel under UDP: (W - 1) / (w - 1), (H - 1) / (h - 1)."""
    h, w = img_size
    return ((w - 1) / (w // stride - 1), (h - 1) / (h // stride - 1))


def encode_heatmaps(
    joints_hm: np.ndarray, visible: np.ndarray, hm_hw: tuple[int, int], sigma: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """(K, h, w) Gaussian targets centred on ``joints_hm`` (K, 2, heatmap pixels) and (K,) target weights.

    A joint gets weight 0 when unlabelled or when its 3-sigma square misses the heatmap entirely.
    """
    h, w = hm_hw
    k = len(joints_hm)
    targets = np.zeros((k, h, w), np.float32)
    weights = np.zeros(k, np.float32)
    xs, ys = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)
    for j in range(k):
        mx, my = joints_hm[j]
        if not visible[j] or mx + 3 * sigma < 0 or my + 3 * sigma < 0 or mx - 3 * sigma >= w or my - 3 * sigma >= h:
            continue
        gx = np.exp(-((xs - mx) ** 2) / (2 * sigma**2))
        gy = np.exp(-((ys - my) ** 2) / (2 * sigma**2))
        targets[j] = np.outer(gy, gx)
        weights[j] = 1.0
    return targets, weights


def decode_heatmaps(heatmaps: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) heatmaps -> (B, K, 3): argmax (x, y) moved a quarter pixel toward the higher neighbour, peak."""
    b, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(b, k, -1)
    peak, index = flat.max(dim=2)
    x, y = (index % w).long(), torch.div(index, w, rounding_mode="floor").long()
    hm = heatmaps.reshape(b * k, h, w)
    rows = torch.arange(b * k)
    xf, yf = x.reshape(-1), y.reshape(-1)
    inner_x = (xf > 0) & (xf < w - 1)
    inner_y = (yf > 0) & (yf < h - 1)
    dx = hm[rows, yf, (xf + 1).clamp(max=w - 1)] - hm[rows, yf, (xf - 1).clamp(min=0)]
    dy = hm[rows, (yf + 1).clamp(max=h - 1), xf] - hm[rows, (yf - 1).clamp(min=0), xf]
    px = xf.to(heatmaps.dtype) + 0.25 * torch.sign(dx) * inner_x
    py = yf.to(heatmaps.dtype) + 0.25 * torch.sign(dy) * inner_y
    return torch.stack([px.reshape(b, k), py.reshape(b, k), peak], dim=2)


def decode_heatmaps_dark(heatmaps: torch.Tensor, kernel: int = 11) -> torch.Tensor:
    """(B, K, h, w) heatmaps -> (B, K, 3): argmax refined by one Newton step on the log of the blurred heatmap
    (DARK as UDP uses it: Gaussian blur of size ``kernel``, values clipped to [0.001, 50], edge padding), peak."""
    import torchvision.transforms.functional as TF

    b, k, h, w = heatmaps.shape
    peak, index = heatmaps.reshape(b, k, -1).max(dim=2)
    x, y = (index % w).double(), torch.div(index, w, rounding_mode="floor").double()
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8  # what cv2.GaussianBlur derives from the kernel size
    blurred = TF.gaussian_blur(heatmaps.double().reshape(b * k, 1, h, w), [kernel, kernel], [sigma, sigma])
    logs = torch.nn.functional.pad(blurred.clamp(0.001, 50).log(), (1, 1, 1, 1), mode="replicate")[:, 0]
    rows = torch.arange(b * k)
    xi, yi = x.reshape(-1).long() + 1, y.reshape(-1).long() + 1  # positions in the padded map

    def at(dx: int, dy: int) -> torch.Tensor:
        return logs[rows, yi + dy, xi + dx]

    center = at(0, 0)
    gx, gy = 0.5 * (at(1, 0) - at(-1, 0)), 0.5 * (at(0, 1) - at(0, -1))
    dxx, dyy = at(1, 0) - 2 * center + at(-1, 0), at(0, 1) - 2 * center + at(0, -1)
    dxy = 0.5 * (at(1, 1) - at(1, 0) - at(0, 1) + 2 * center - at(-1, 0) - at(0, -1) + at(-1, -1))
    hessian = torch.stack([dxx, dxy, dxy, dyy], dim=1).reshape(-1, 2, 2) + torch.finfo(torch.float32).eps * torch.eye(2)
    step = torch.linalg.solve(hessian, torch.stack([gx, gy], dim=1)[..., None])[..., 0]
    px, py = x.reshape(-1) - step[:, 0], y.reshape(-1) - step[:, 1]
    return torch.stack([px.reshape(b, k), py.reshape(b, k), peak.double()], dim=2).to(heatmaps.dtype)
