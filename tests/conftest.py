"""Shared test fixtures. Owners: the io/preprocessing tests use ``ct_phantom`` (an
analytic CT phantom, NOT clinical data) and ``ct_grid``."""

from __future__ import annotations

import numpy as np
import pytest

# Structures in world RAS mm: (centre, radii, HU, label). The bone marker sits off every
# symmetry plane so any flip or axis swap moves it visibly.
CT_PHANTOM_STRUCTURES = (
    ((0.0, 0.0, 0.0), (27.0, 22.0, 26.0), 40.0, 0),  # body (soft tissue)
    ((9.0, 4.0, -3.0), (10.0, 8.0, 11.0), 120.0, 1),  # "liver"
    ((-13.0, -9.0, 12.0), (5.5, 5.5, 6.5), 700.0, 2),  # bone marker
)


def ct_grid(spacing, shape, axcodes="RAS", low_corner=(-30.0, -30.0, -30.0)) -> np.ndarray:
    """Affine (voxel -> RAS mm) of an axis-aligned grid in the given stored orientation.

    The grid covers the RAS box starting at ``low_corner`` (centre of its lowest voxel);
    axcodes may permute/flip axes, e.g. "LPS" or "PSL". spacing/shape are per stored axis.
    """
    axis_of = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    origin = np.array(low_corner, dtype=float)
    for stored, code in enumerate(axcodes):
        world = axis_of[code]
        sign = 1.0 if code in "RAS" else -1.0
        affine[world, stored] = sign * spacing[stored]
        if sign < 0:
            origin[world] += (shape[stored] - 1) * spacing[stored]
    affine[:3, 3] = origin
    return affine


def _sample(affine, shape):
    """HU float32 [X, Y, Z] and uint8 labels of the phantom on the grid (smooth edges)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), axis=-1)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    hu = np.full(shape, -1000.0)
    labels = np.zeros(shape, dtype=np.uint8)
    for centre, radii, value, label in CT_PHANTOM_STRUCTURES:
        rho = np.sqrt((((xyz - centre) / radii) ** 2).sum(-1))
        distance_mm = (rho - 1.0) * min(radii)
        weight = 1.0 / (1.0 + np.exp(distance_mm / 1.5))  # ~2 mm soft edge: interpolation-friendly
        hu = hu * (1.0 - weight) + value * weight
        if label:
            labels[rho <= 1.0] = label
    return hu.astype(np.float32), labels


@pytest.fixture
def ct_phantom():
    """Factory: ct_phantom(spacing=(1.25, 1.5, 2.5), shape=(48, 40, 24), axcodes="RAS")
    -> (hu [X,Y,Z] float32, labels [X,Y,Z] uint8, affine). Synthetic, not clinical data."""

    def make(spacing=(1.25, 1.5, 2.5), shape=(48, 40, 24), axcodes="RAS", affine=None):
        affine = ct_grid(spacing, shape, axcodes) if affine is None else np.asarray(affine, dtype=float)
        hu, labels = _sample(affine, shape)
        return hu, labels, affine

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny models (``pytestmark =
    pytest.mark.usefixtures("one_torch_thread")``): on a shared 2-core machine a second
    OpenMP thread only spin-waits and synchronises, which costs more than the work."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
