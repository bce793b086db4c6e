"""Network pieces of the self-supervised reconstruction (:mod:`spiflow.selfsup`).

* :func:`rotation_6d_to_matrix` / :func:`matrix_to_rotation_6d`: the continuous 6D rotation
  representation of Y. Zhou et al., "On the continuity of rotation representations in
  neural networks", CVPR 2019, sec. 4.2 (Gram–Schmidt on two 3-vectors; here, as in
  PyTorch3D, the two vectors are the first two *rows* of the matrix).
* :class:`ResNetEncoder`: a ResNet (K. He et al., CVPR 2016) with BasicBlocks; width 64,
  4 stages of 2 blocks is ResNet-18, the encoder of Chen et al. (arXiv 2311.16652).
* :class:`Siren`: sine-activated MLP of V. Sitzmann et al., NeurIPS 2020, with the
  initialisation of their sec. 3.2 as written in the reference code's ``siren-pytorch``:
  first layer ``sin(ω₀ (W x + b))``, W, b ~ U(−1/d_in, 1/d_in); hidden layers ``sin(W x + b)``,
  W, b ~ U(−√(6/d_in), √(6/d_in)); a linear last layer initialised like the hidden ones.
* :class:`FriedelSiren` (``f(u) + f(−u)``) and :class:`VoxelVolume` (a learnable volume on
  the spiflow grid, symmetrised, sampled trilinearly): the two decoders. Both take
  ``u = q / grid.q_max`` (…, 3), axes (qx, qy, qz), and are exactly Friedel symmetric.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rotation_6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) from 6D vectors (..., 6) by Gram–Schmidt (Zhou et al. 2019).

    Rows: ``b1 = a1/|a1|``, ``b2 = normalise(a2 − (b1·a2) b1)``, ``b3 = b1 × b2`` with
    ``a1, a2 = d6[..., :3], d6[..., 3:]``; always proper (det +1) and orthonormal.
    """
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    return torch.stack([b1, b2, torch.linalg.cross(b1, b2, dim=-1)], dim=-2)


def matrix_to_rotation_6d(mat: torch.Tensor) -> torch.Tensor:
    """The 6D vectors (..., 6) of rotation matrices (..., 3, 3): their first two rows.

    Inverse of :func:`rotation_6d_to_matrix` on rotations."""
    return mat[..., :2, :].reshape(mat.shape[:-2] + (6,))


class _Block(nn.Module):
    """ResNet BasicBlock: two 3×3 conv–BN layers and an identity (or 1×1 conv–BN) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNetEncoder(nn.Module):
    """ResNet trunk: (B, 1, ny, nx) image → (B, C) features (C below).

    Stage s has ``blocks`` BasicBlocks of ``width · 2**s`` channels (stride 2 from s = 1).
    Stem: ImageNet-style (7×7 conv, stride 2, 3×3 max pool) when ``min(ny, nx) >= 64``,
    else one 3×3 conv, stride 1 (CIFAR-style, so small patterns keep their pixels).
    Ends in average pooling to ``pool × pool`` cells, flattened (``pool`` 1: global average
    pooling, as ResNet; then ``C = width · 2**(stages − 1)``, else ``C · pool²``): cells keep
    where on the detector the features lie, which an orientation depends on. Kaiming-normal
    convolutions, BN weight 1 and bias 0.
    """

    def __init__(self, image_size: int, width: int, stages: int, blocks: int, pool: int = 1):
        super().__init__()
        if image_size >= 64:
            stem = [nn.Conv2d(1, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                    nn.MaxPool2d(3, 2, 1)]
        else:
            stem = [nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        layers, c = stem, width
        for s in range(stages):
            c_out = width * 2 ** s
            for b in range(blocks):
                layers.append(_Block(c, c_out, 2 if (s > 0 and b == 0) else 1))
                c = c_out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(pool), nn.Flatten())
        self.features = c * pool * pool
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Siren(nn.Module):
    """SIREN MLP ``R^d_in → R^d_out`` with ``layers`` sine layers of ``width`` (see module doc)."""

    def __init__(self, d_in: int, d_out: int, width: int, layers: int, omega0: float):
        super().__init__()
        self.omega0 = float(omega0)
        self.hidden = nn.ModuleList()
        for i in range(layers):
            lin = nn.Linear(d_in if i == 0 else width, width)
            bound = 1.0 / d_in if i == 0 else math.sqrt(6.0 / width)
            nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.uniform_(lin.bias, -bound, bound)
            self.hidden.append(lin)
        self.last = nn.Linear(width, d_out)
        bound = math.sqrt(6.0 / width)
        nn.init.uniform_(self.last.weight, -bound, bound)
        nn.init.uniform_(self.last.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, lin in enumerate(self.hidden):
            x = torch.sin(self.omega0 * lin(x)) if i == 0 else torch.sin(lin(x))
        return self.last(x)


class FriedelSiren(nn.Module):
    """``f(u) + f(−u)`` with f a scalar :class:`Siren`: u (..., 3) → (...), Friedel symmetric."""

    def __init__(self, width: int, layers: int, omega0: float):
        super().__init__()
        self.net = Siren(3, 1, width, layers, omega0)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        out = self.net(torch.stack([u, -u])).squeeze(-1)
        return out[0] + out[1]


class VoxelVolume(nn.Module):
    """A learnable volume V (n, n, n) on the centred grid, read as ``(V + flip V) / 2`` by
    trilinear interpolation at u (..., 3) = q / q_max (±1 = the outer voxel centres,
    zero outside the cube), so exactly Friedel symmetric. Starts at 0."""

    def __init__(self, n: int):
        super().__init__()
        self.volume = nn.Parameter(torch.zeros((n, n, n)))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        vol = 0.5 * (self.volume + torch.flip(self.volume, (0, 1, 2)))
        g = u.reshape(1, -1, 1, 1, 3)[..., [2, 1, 0]].to(vol.dtype)  # grid_sample wants (z, y, x)
        out = F.grid_sample(vol[None, None], g, mode="bilinear", padding_mode="zeros", align_corners=True)
        return out.reshape(u.shape[:-1])
