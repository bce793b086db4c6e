#!/usr/bin/env python
"""Why the first ae3d network collapsed: can its encoder tell intensities apart?

    PYTHONPATH=pkg python benchmarks/ae3d_collapse.py [--threads 1]

The encoder of :class:`spiflow.ae3d.AE3D` (n = 17, channels 8, latent 32) plus a linear head
is trained to regress the crystal size R (voxels; what sets the width of the central
speckle) from :func:`spiflow.ae3d.network_input` of 128 simulated crystals (R ~ U[2.2, 3.0],
seed 2024; Adam, batch 16, 6 epochs), with and without the per-voxel input standardisation
(:meth:`spiflow.ae3d.AE3D.set_input_statistics`), and at two learning rates. Prints the
held-out R² (32 crystals, seed 2025) after each epoch and the spread of the inputs: a
regression that stays at R² ≈ 0 means the encoder's features do not depend on the input.
"""
from __future__ import annotations

import argparse

import torch

from spiflow import ae3d, bragg
from spiflow.settings import CrystalsSettings


def run(train, test, standardise: bool, lr: float, epochs: int = 6):
    torch.manual_seed(0)
    model = ae3d.AE3D(17, 8, 32)
    xtr = ae3d.network_input(train.intensity, train.measured)
    xte = ae3d.network_input(test.intensity, test.measured)
    if standardise:
        model.set_input_statistics(xtr)
    head = torch.nn.Linear(32, 1)
    ytr = torch.tensor(train.params[:, 0], dtype=torch.float32)
    yte = torch.tensor(test.params[:, 0], dtype=torch.float32)
    mu, sd = ytr.mean(), ytr.std()
    opt = torch.optim.Adam([*model.enc.parameters(), *model.to_z.parameters(), *head.parameters()], lr=lr)
    gen = torch.Generator().manual_seed(0)
    r2 = []
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=gen)
        for b in range(0, len(ytr), 16):
            i = perm[b:b + 16]
            loss = ((head(model.encode(xtr[i]))[:, 0] - (ytr[i] - mu) / sd) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = head(model.encode(xte))[:, 0] * sd + mu
        r2.append(1 - float(((pred - yte) ** 2).mean() / yte.var()))
    return r2


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cr = CrystalsSettings(n=17, size_range_voxels=[2.2, 3.0])
    train, test = bragg.simulate_crystals(cr, 128, 2024), bragg.simulate_crystals(cr, 32, 2025)
    x = ae3d.network_input(train.intensity, train.measured)[:, 0]
    print(f"input channel 0: mean |x| {x.abs().mean():.3f}, per-voxel std across crystals {x.std(0).mean():.3f}")
    for standardise, lr in [(False, 3e-3), (True, 3e-3), (False, 3e-4)]:
        r2 = run(train, test, standardise, lr)
        print(f"standardised={standardise!s:5} lr={lr:g}: held-out R^2 per epoch " + " ".join(f"{v:.2f}" for v in r2),
              flush=True)


if __name__ == "__main__":
    main()
