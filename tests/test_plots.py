"""Each plot function writes a non-empty PNG of the documented pixel size."""
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import torch

from spiflow import plots
from spiflow.grid import Grid
from spiflow.metrics import fsc

GRID = Grid(15, 0.02)


def check_png(path, name):
    assert path.exists() and path.stat().st_size > 1000
    img = mpimg.imread(path)
    w, h = plots.FIGSIZE[name]
    assert img.shape[:2] == (round(h * plots.DPI), round(w * plots.DPI))
    assert img[..., :3].std() > 0.01  # something was drawn


def test_plot_fsc(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.standard_normal((GRID.n,) * 3)
    tables = {"truth": fsc(v, v + 0.3 * rng.standard_normal(v.shape), GRID),
              "emc": fsc(v, v + 2.0 * rng.standard_normal(v.shape), GRID)}
    path = tmp_path / "fsc.png"
    plots.plot_fsc(tables, path)
    check_png(path, "fsc")
    with pytest.raises(ValueError):
        plots.plot_fsc({}, tmp_path / "x.png")


def test_plot_intensity_sections(tmp_path):
    q = GRID.q_norm()
    truth = np.exp(-(q / 0.05) ** 2) + 1e-4
    recon = torch.from_numpy(3 * truth * (1 + 0.1 * np.random.default_rng(1).random(truth.shape)))
    path = tmp_path / "sub" / "sections.png"
    plots.plot_intensity_sections(truth, recon, GRID, path, title="emc")
    check_png(path, "intensity_sections")
    with pytest.raises(ValueError):
        plots.plot_intensity_sections(truth[:-1], truth, GRID, tmp_path / "x.png")


def test_plot_density_slices(tmp_path):
    r = GRID.r_axis
    rr = r[:, None, None] ** 2 + r[None, :, None] ** 2 + (r[None, None, :] - 3) ** 2
    truth = np.exp(-rr / 20.0)
    for project in (False, True):
        path = tmp_path / f"density_{project}.png"
        plots.plot_density_slices(truth, 0.9 * truth, GRID, path, project=project)
        check_png(path, "density_slices")


def test_plot_orientation_errors(tmp_path):
    path = tmp_path / "err.png"
    plots.plot_orientation_errors(np.abs(np.random.default_rng(2).normal(0, 3, 200)), path)
    check_png(path, "orientation_errors")
    with pytest.raises(ValueError):
        plots.plot_orientation_errors([], tmp_path / "x.png")


def test_plot_pattern_montage(tmp_path):
    rng = np.random.default_rng(3)
    photons = rng.poisson(0.5, (5, 24, 20))
    valid = np.ones((24, 20), bool)
    valid[10:14, :] = False
    path = tmp_path / "montage.png"
    plots.plot_pattern_montage(photons, valid, path)
    check_png(path, "pattern_montage")
    with pytest.raises(ValueError):
        plots.plot_pattern_montage(photons, valid[:-1], tmp_path / "x.png")


def test_plot_emc_log(tmp_path):
    it = np.arange(10)
    log = pd.DataFrame({"iteration": it, "beta": 0.01 * 1.5 ** it, "log_likelihood": -1e5 + 1e3 * it,
                        "rms_change": 0.5 ** it, "mutual_info": 1 + 0.2 * it, "seconds": 0.1 * it})
    path = tmp_path / "emc.png"
    plots.plot_emc_log(log, path)
    check_png(path, "emc_log")
    with pytest.raises(ValueError):
        plots.plot_emc_log(log.drop(columns="beta"), tmp_path / "x.png")
