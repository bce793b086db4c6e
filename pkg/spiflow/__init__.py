"""spiflow: XFEL single-particle imaging reconstruction (simulate, EMC, phasing, FSC).

Numerical kernels in PyTorch so the same code runs on CPU and CUDA. Conventions for
units, axes and rotations are those of docs/conventions.md: lengths in Å,
q = k_out − k_in in Å⁻¹ without 2π, quaternions [w, x, y, z] with w >= 0.
"""
__version__ = "0.1.0"
