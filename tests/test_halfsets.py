"""Tests of spiflow.halfsets: the even/odd split, the half-set FSC, the PRTF table."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import yaml

from spiflow import halfsets
from spiflow.align import fourier_shift, rotate_volume
from spiflow.config import load_config
from spiflow.simulate import simulate
from test_align import GRID, blob_model, density, intensity, random_rotation
from test_workflow import TINY


def test_split_halves_even_and_odd_frames_exactly(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**TINY, "dataset": {**TINY["dataset"], "n_patterns": 101,
                                                                           "chunk_frames": 20}}))
    p = tmp_path / "patterns.zarr"
    simulate(load_config(tmp_path / "c.yaml"), p, tmp_path / "truth.zarr", progress=False)
    counts = halfsets.split_halves(p, [tmp_path / "h1.zarr", tmp_path / "h2.zarr"])
    assert counts == [51, 50]
    src = xr.open_zarr(p)
    for h, frames in ((1, np.arange(0, 101, 2)), (2, np.arange(1, 101, 2))):
        half = xr.open_zarr(tmp_path / f"h{h}.zarr")
        np.testing.assert_array_equal(half.photons.values, src.photons.values[frames])
        np.testing.assert_array_equal(half.frame.values, frames)  # the source's frame indices
        for v in ("valid", "q", "pixel_factor"):
            np.testing.assert_array_equal(half[v].values, src[v].values)
        assert half.attrs["half_set"] == h and half.photons.encoding["chunks"][0] == 20
        assert half.attrs["nominal_fluence_photons_per_angstrom2"] == src.attrs["nominal_fluence_photons_per_angstrom2"]
    with pytest.raises(ValueError, match="no 'photons'"):
        halfsets.split_halves(tmp_path / "truth.zarr", [tmp_path / "x1.zarr", tmp_path / "x2.zarr"])
    assert not (tmp_path / "x1.zarr").exists()


@pytest.mark.slow
def test_halfset_fsc_undoes_rotation_translation_and_inversion():
    pos, amp, width = blob_model(4)
    rho, I = density(pos, amp, width), intensity(pos, amp, width)
    R = random_rotation(11)
    # half 2: the same particle, rotated, shifted by (2, -1, 3) voxels and inverted
    rho2 = fourier_shift(torch.as_tensor(np.asarray(rotate_volume(rho, R))), (2.0, -1.0, 3.0)).numpy()
    rho2 = rho2[::-1, ::-1, ::-1].copy()
    I2 = np.asarray(rotate_volume(I, R))
    table, info = halfsets.halfset_fsc(rho, rho2, I, I2, GRID, align_num_div=4)
    low = table[(table.q_inv_angstrom > 0) & (table.q_inv_angstrom < GRID.q_max / 2)]
    assert low.fsc.min() > 0.95  # trilinear rotation blurs only the highest shells
    assert info["halfset_resolution_fsc0143_angstrom"] <= 1 / (0.7 * GRID.q_max)
    assert info["halfset_rotation_cc"] > 0.8 and info["halfset_density_cc"] > 0.9
    # an unrelated particle: the FSC falls at once
    other = blob_model(5)
    _, info_other = halfsets.halfset_fsc(rho, density(*other), I, intensity(*other), GRID, align_num_div=4)
    assert info_other["halfset_resolution_fsc0143_angstrom"] > 2 * info["halfset_resolution_fsc0143_angstrom"]


def test_prtf_table_and_its_resolution_at_one_over_e():
    q = np.linspace(0.01, 0.2, 20)
    prtf = np.exp(-q / 0.1)  # crosses 1/e at q = 0.1 Å⁻¹ exactly
    den = xr.Dataset(attrs={"prtf": prtf.tolist(), "prtf_q_inv_angstrom": q.tolist()})
    t = halfsets.prtf_table(den)
    assert list(t.columns) == ["q_inv_angstrom", "resolution_angstrom", "prtf"]
    assert halfsets.prtf_resolution(t) == pytest.approx(10.0, rel=2e-3)  # linear interpolation between shells
    assert math.isnan(halfsets.prtf_resolution(pd.DataFrame({"q_inv_angstrom": q, "prtf": np.nan})))
    with pytest.raises(ValueError, match="no PRTF"):
        halfsets.prtf_table(xr.Dataset())
