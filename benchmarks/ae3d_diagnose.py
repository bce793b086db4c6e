"""Where a trained ae3d network's error lies, on a workflow run's held-out crystals.

    PYTHONPATH=pkg python benchmarks/ae3d_diagnose.py results/RUN/ae3d

reads ``model.pt`` and ``test/crystals{,_truth}.zarr`` under that directory and prints the
median complex error (:func:`spiflow.bragg.complex_errors`: global phase, translation and
twin removed) over the held-out crystals of: the network; the true amplitude with the
network's phase (the network's density aligned onto the truth first); the network's
amplitude with the true phase; the true amplitude with a flat phase; the network's amplitude
with the conjugate phase (the other sign of the strain head); and the fraction of crystals
whose chosen sign is no worse than the other.
"""
import sys

import numpy as np
import torch

from spiflow import ae3d
from spiflow.bragg import align_complex, complex_errors, read_crystal_set


def main(run_dir: str) -> None:
    torch.set_num_threads(2)
    model = ae3d.load_model(f"{run_dir}/model.pt")
    test = read_crystal_set(f"{run_dir}/test/crystals.zarr", f"{run_dir}/test/crystals_truth.zarr")
    pred = ae3d.predict(model, test.intensity, test.measured)
    rows = []
    for p, amp, phase in zip(pred, test.amplitude, test.phase):
        truth = amp * np.exp(1j * phase)
        aligned = align_complex(p, truth)[0]

        def err(d):
            return complex_errors(d, truth, test.grid)["complex_error"]

        rows.append([err(p), err(amp * np.exp(1j * np.angle(aligned))), err(np.abs(aligned) * np.exp(1j * phase)),
                     err(amp.astype(np.complex128)), err(np.conj(p))])
    rows = np.array(rows)
    r = np.median(rows, 0)
    print(f"{run_dir} ({model.phase_head} head, {len(rows)} held-out crystals, medians): network {r[0]:.3f}; "
          f"true amplitude + network phase {r[1]:.3f}; network amplitude + true phase {r[2]:.3f}; "
          f"true amplitude + flat phase {r[3]:.3f}; network with the conjugate phase {r[4]:.3f}; "
          f"chosen sign no worse on {np.mean(rows[:, 0] <= rows[:, 4]):.2f} of the crystals")


if __name__ == "__main__":
    main(sys.argv[1])
