"""Procedural torso phantoms in Hounsfield units: lung bases and heart down to the bladder.

Synthetic, not clinical data. Every structure is defined in continuous patient
coordinates (mm; RAS+ axes: +x toward the patient's RIGHT, +y anterior, +z superior;
origin on the body axis at the top of the right hemidiaphragm) and sampled at the voxel
centres of the output grid, so the same case renders the same anatomy at any shape.
Shapes are ellipsoids perturbed by radial harmonics and warped by a smooth random
displacement field; intensities depend on the contrast phase; the image then gets
in-plane blur, partial-volume blur along z from the slice thickness and spatially
correlated noise. Sub-voxel bright objects (stones, plaques) are splatted with their
volume fraction, as partial volume would show them.
"""

from __future__ import annotations

import zlib

import numpy as np
from scipy import ndimage

from volumevlm.data.labels import LABEL_INDEX

L = LABEL_INDEX

# HU by tissue and contrast phase: (non-contrast, arterial, portal venous).
_HU = {
    "fat": (-100, -100, -100), "muscle": (50, 58, 62), "lung": (-860, -860, -860),
    "blood_arterial": (42, 320, 170), "blood_venous": (42, 80, 150), "myocardium": (45, 110, 95),
    "liver": (58, 72, 108), "spleen": (48, 125, 115), "pancreas": (42, 110, 95),
    "kidney_cortex": (32, 190, 165), "kidney_medulla": (32, 70, 155), "renal_sinus": (-70, -70, -70),
    "bowel_wall": (40, 95, 90), "fluid": (10, 10, 12), "urine": (8, 8, 10), "bile": (6, 6, 8),
    "node": (45, 80, 85), "thrombus": (45, 50, 55), "disc": (85, 85, 85), "cortical_bone": (750, 750, 750),
    "csf": (12, 12, 12), "gas": (-1000, -1000, -1000), "table": (250, 250, 250),
}
_PHASE_INDEX = {"non-contrast": 0, "arterial": 1, "portal venous": 2}


class _Grid:
    """Voxel centres of the canonical RAS output grid in (warped) patient coordinates, mm."""

    def __init__(self, px: np.ndarray, py: np.ndarray, pz: np.ndarray, spacing, warp_terms):
        self.px, self.py, self.pz = px, py, pz
        self.spacing = np.asarray(spacing, dtype=np.float64)
        # Broadcast axes rather than a meshgrid: each voxel sees the same float32 operations in the
        # same order, but the products with the wave vector are taken once per axis value.
        X, Y, Z = px.astype(np.float32)[:, None, None], py.astype(np.float32)[None, :, None], pz.astype(np.float32)[None, None, :]
        shape = (len(px), len(py), len(pz))
        # Smooth displacement field: a few long-wavelength sinusoids per axis (mm).
        disp = []
        for terms in warp_terms:
            d = np.zeros(shape, dtype=np.float32)
            for amp, wv, phase in terms:
                d += np.float32(amp) * np.sin(np.float32(wv[0]) * X + np.float32(wv[1]) * Y + np.float32(wv[2]) * Z + np.float32(phase))
            disp.append(d)
        self.max_disp = float(sum(abs(a) for terms in warp_terms for a, _, _ in terms))
        self.qx, self.qy, self.qz = X + disp[0], Y + disp[1], Z + disp[2]
        self.shape = shape
        # How far q strays from the voxel centre along each axis, measured rather than bounded
        # (max_disp sums all three axes' amplitudes): it sets the tight boxes of reach(). The
        # 0.01 mm covers float32 rounding of the centres and of the sum (~1e-4 mm at 500 mm).
        self.disp_mm = [max(float(d.max()), -float(d.min())) + 0.01 for d in disp]

    def box(self, center, half) -> tuple[slice, slice, slice] | None:
        """Index slices covering center +- half (mm) plus the warp's reach; None if outside the grid."""
        out = []
        for axis, c, h in zip((self.px, self.py, self.pz), center, np.broadcast_to(half, (3,))):
            h = h + self.max_disp + 2 * np.abs(axis[1] - axis[0])
            lo = int(np.searchsorted(axis, c - h))
            hi = int(np.searchsorted(axis, c + h))
            lo, hi = max(lo, 0), min(hi, len(axis))
            if hi <= lo:
                return None
            out.append(slice(lo, hi))
        return tuple(out)

    def q(self, box):
        return self.qx[box], self.qy[box], self.qz[box]

    def reach(self, box, center, half):
        """Slices, relative to box, of the voxels whose warped centre can lie within center +- half (mm).

        Unlike box() this is tight (measured displacement per axis, no voxel padding), so it must
        only decide where to skip work whose result is already known, never a painted region's
        extent. None when no voxel of box can reach.
        """
        out = []
        for axis, sl, c, h, reach in zip((self.px, self.py, self.pz), box, center, half, self.disp_mm):
            b0, b1, _ = sl.indices(len(axis))
            h = h + reach + 1.0  # 1 mm of slack on top of the measured reach
            lo = max(int(np.searchsorted(axis, c - h)), b0)
            hi = min(int(np.searchsorted(axis, c + h)), b1)
            if hi <= lo:
                return None
            out.append(slice(lo - b0, hi - b0))
        return tuple(out)

    def index_of(self, point) -> np.ndarray:
        """Fractional voxel index of an (unwarped) patient point."""
        return np.array([(p - a[0]) / (a[1] - a[0]) for p, a in zip(point, (self.px, self.py, self.pz))])


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Shape:
    """An ellipsoid (center, radii mm, rotation) with a radial harmonic perturbation of its surface."""

    def __init__(self, rng: np.random.Generator, center, radii, *, rot_deg=12.0, bumpiness=0.08, nodular=0.0):
        self.center = np.asarray(center, dtype=np.float64)
        self.radii = np.asarray(radii, dtype=np.float64)
        self.rot = _rotation(rng, rot_deg)
        self.dirs = rng.normal(size=(3, 3))
        self.dirs /= np.linalg.norm(self.dirs, axis=1, keepdims=True)
        self.lin = rng.uniform(-bumpiness, bumpiness, size=3)
        self.quad = rng.uniform(-bumpiness, bumpiness, size=3)
        self.nodular = nodular
        self.nod_dirs = rng.normal(size=(6, 3))
        self.nod_phase = rng.uniform(0, 2 * np.pi, size=6)

    def rho(self, grid: _Grid, box, skip: bool = True) -> np.ndarray:
        """Normalised radius in the box: < 1 inside, 1 on the perturbed surface.

        Exact wherever it can be below 1, +inf where the perturbation's bound rules that out.
        Callers only threshold it at values <= 1, so their masks are those of evaluating every
        voxel: the voxels kept go through the same float operations in the same order.
        skip=False evaluates every voxel (the reference the tests hold skipping to).
        """
        qx, qy, qz = grid.q(box)
        # |c| <= 1 below, so pert lies within 1 +- slack; rho < 1 needs rad < pert.
        slack = float(np.abs(self.lin).sum() + np.abs(self.quad).sum() * 2 / 3 + 6 * abs(self.nodular))
        lim = (1 + slack) * 1.01 + 1e-3
        if skip and 1 - slack > 0.05:
            half = lim * np.sqrt(((self.rot * self.radii) ** 2).sum(axis=1))
            sub = grid.reach(box, self.center, half)
            if sub is None:
                return np.full(qx.shape, np.inf)
        else:  # pert could approach zero (no bound), or asked to evaluate everywhere
            sub, lim = (slice(None),) * 3, np.inf
        d = [qx[sub] - self.center[0], qy[sub] - self.center[1], qz[sub] - self.center[2]]
        r = self.rot.T.astype(np.float32)
        u = [(r[i, 0] * d[0] + r[i, 1] * d[1] + r[i, 2] * d[2]) / np.float32(self.radii[i]) for i in range(3)]
        rad = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2) + np.float32(1e-6)
        keep = rad < lim
        if not keep.all():
            u, rad = [v[keep] for v in u], rad[keep]
        pert = np.ones_like(rad)
        for k in range(3):
            c = (self.dirs[k, 0] * u[0] + self.dirs[k, 1] * u[1] + self.dirs[k, 2] * u[2]) / rad
            pert += np.float32(self.lin[k]) * c + np.float32(self.quad[k]) * (c * c - np.float32(1 / 3))
        if self.nodular:
            for k in range(6):
                c = (self.nod_dirs[k, 0] * u[0] + self.nod_dirs[k, 1] * u[1] + self.nod_dirs[k, 2] * u[2]) / rad
                pert += np.float32(self.nodular) * np.sin(np.float32(9.0) * c + np.float32(self.nod_phase[k]))
        out = np.full(qx.shape, np.inf, dtype=rad.dtype)
        if rad.shape == keep.shape:
            out[sub] = rad / pert
        else:
            out[sub][keep] = rad / pert
        return out

    def box(self, grid: _Grid):
        return grid.box(self.center, self.radii.max() * 1.35)

    def point(self, local) -> np.ndarray:
        """Patient coordinates of a point given in the shape's unit-ball coordinates."""
        return self.center + self.rot @ (np.asarray(local) * self.radii)


class _Canvas:
    """HU image and label map being painted; later paint wins."""

    def __init__(self, shape, phase: str):
        self.hu = np.full(shape, -1000.0, dtype=np.float32)
        self.lab = np.zeros(shape, dtype=np.uint8)
        self.k = _PHASE_INDEX[phase]

    def val(self, tissue: str) -> float:
        return float(_HU[tissue][self.k])

    def paint(self, box, mask, hu, label=None):
        if box is None or not mask.any():
            return
        sub = self.hu[box]
        sub[mask] = hu if np.isscalar(hu) else hu[mask]
        if label is not None:
            self.lab[box][mask] = label


def _splat(canvas: _Canvas, grid: _Grid, point, diameter_mm: float, delta_hu: float) -> None:
    """Add a sub-voxel sphere by its volume fraction (trilinear splat): partial volume of tiny objects."""
    idx = grid.index_of(point)
    base = np.floor(idx).astype(int)
    frac = idx - base
    voxel_mm3 = float(np.prod(np.abs(grid.spacing)))
    amount = delta_hu * (np.pi / 6.0) * diameter_mm**3 / voxel_mm3
    for corner in np.ndindex(2, 2, 2):
        i = base + np.array(corner)
        if np.any(i < 0) or np.any(i >= np.array(canvas.hu.shape)):
            continue
        wgt = np.prod(np.where(np.array(corner) == 1, frac, 1 - frac))
        canvas.hu[tuple(i)] += np.float32(amount * wgt)


def _sphere(canvas: _Canvas, grid: _Grid, rng, point, diameter_mm: float, hu: float, delta_from: float, label=None,
            restrict_label=None) -> None:
    """A small round object: painted when larger than a voxel, splatted when smaller."""
    if diameter_mm < 1.2 * float(np.min(np.abs(grid.spacing))):
        _splat(canvas, grid, point, diameter_mm, hu - delta_from)
        return
    s = _Shape(rng, point, [diameter_mm / 2] * 3, bumpiness=0.05)
    box = s.box(grid)
    if box is None:
        return
    m = s.rho(grid, box) < 1
    if restrict_label is not None:
        m &= canvas.lab[box] == restrict_label
    canvas.paint(box, m, hu, label)


def _tube_mask(grid: _Grid, box, points: np.ndarray, radii: np.ndarray, skip: bool = True) -> np.ndarray:
    """Normalised distance to a tube along a polyline (points [N,3] mm) with radius per point
    (linear between): < 1 inside.

    Exact wherever it is below 1. A segment is evaluated only on the voxels it can reach: elsewhere
    its distance is >= 1 and cannot lower a minimum that is below 1, so thresholds at 1 see the
    values of evaluating every segment everywhere (+inf where no segment reaches), which is
    what skip=False computes.
    """
    qx, qy, qz = grid.q(box)
    best = np.full(qx.shape, np.inf, dtype=np.float32)
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
        ab = b - a
        L2 = float(ab @ ab)
        if skip and min(ra, rb) > 0:
            sub = grid.reach(box, (a + b) / 2, np.abs(ab) / 2 + max(ra, rb) * 1.01 + 1e-3)
            if sub is None:
                continue
        else:
            sub = (slice(None),) * 3
        sx, sy, sz = qx[sub], qy[sub], qz[sub]
        t = ((sx - a[0]) * ab[0] + (sy - a[1]) * ab[1] + (sz - a[2]) * ab[2]) / np.float32(L2)
        t = np.clip(t, 0, 1)
        dx, dy, dz = sx - (a[0] + t * ab[0]), sy - (a[1] + t * ab[1]), sz - (a[2] + t * ab[2])
        dist = np.sqrt(dx * dx + dy * dy + dz * dz) / (np.float32(ra) + t * np.float32(rb - ra))
        part = best[sub]
        np.minimum(part, dist, out=part)
    return best


def _polyline_box(grid: _Grid, points: np.ndarray, radii: np.ndarray):
    lo, hi = points.min(0) - radii.max(), points.max(0) + radii.max()
    return grid.box((lo + hi) / 2, (hi - lo) / 2)


def render_phantom(case: dict, shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one case on a canonical RAS grid.

    case:  a case dict from :func:`volumevlm.data.synthetic.cohort.sample_case` (patient,
           findings, finding_facts, acquisition).
    shape: (X, Y, Z) voxels; spacing = field of view / shape.
    Returns (hu float32 [X,Y,Z] HU, labels uint8 [X,Y,Z] with volumevlm.data.labels
    indices, affine 4x4 RAS+ mm with a positive diagonal).
    """
    acq, pat, f, x = case["acquisition"], case["patient"], case["findings"], case["finding_facts"]
    X, Y, Z = shape
    sx, sy, sz = acq["fov_mm"] / X, acq["fov_mm"] / Y, acq["z_extent_mm"] / Z
    px = (np.arange(X) - (X - 1) / 2) * sx - acq["patient_offset_mm"][0]
    py = (np.arange(Y) - (Y - 1) / 2) * sy - acq["patient_offset_mm"][1]
    pz = acq["top_mm"] - (Z - 1 - np.arange(Z)) * sz
    # One random stream per structure: toggling a finding changes only its own structure,
    # so a case and its counterfactual (same patient, finding added or removed) align.
    root = int(rng.integers(2**62))

    def part(name: str) -> np.random.Generator:
        return np.random.default_rng([root, zlib.crc32(name.encode())])

    rng = part("warp")
    warp = [[(rng.uniform(-4, 4), rng.normal(size=3) * rng.uniform(0.012, 0.03), rng.uniform(0, 6.3)) for _ in range(2)]
            for _ in range(3)]
    g = _Grid(px, py, pz, (sx, sy, sz), warp)
    cv = _Canvas(g.shape, case["contrast_phase"])
    V = cv.val
    T = acq["trunk_mm"]  # dome of the right hemidiaphragm to the pelvic floor

    # --- body habitus -------------------------------------------------------------------
    rng = part("body")
    bmi = pat["bmi"]
    a = float(np.clip(150 + (bmi - 20) * 2.6 + rng.normal(0, 6), 145, 195))  # half width, mm
    b = a * rng.uniform(0.66, 0.78)
    fat = float(np.clip(6 + (bmi - 19) * 1.7 + rng.normal(0, 4), 5, 50))
    wall = rng.uniform(8, 14)
    ai, bi = a - fat - wall, b - fat - wall
    body_h = [float(v) for v in rng.uniform(-0.04, 0.04, size=4)]  # Python floats keep full-grid math in float32
    full = (slice(None),) * 3
    theta = np.arctan2(g.qy, g.qx)
    outline = 1 + body_h[0] * np.cos(2 * theta) + body_h[1] * np.sin(theta) + body_h[2] * np.cos(3 * theta) + body_h[3] * np.sin(2 * theta)
    taper = 1 - 0.04 * np.sin(np.pi * np.clip((-g.qz) / T, 0, 1))
    rb = np.sqrt((g.qx / (a * taper)) ** 2 + (g.qy / b) ** 2) / outline
    back = g.qy > -b * 0.93
    cv.paint(full, (rb < 1) & back, V("fat"))
    rw = np.sqrt((g.qx / ((a - fat) * taper)) ** 2 + (g.qy / (b - fat)) ** 2) / outline
    cv.paint(full, (rw < 1) & back, V("muscle"))
    rc = np.sqrt((g.qx / ((ai) * taper)) ** 2 + (g.qy / bi) ** 2) / outline
    cavity = rc < 1
    cv.paint(full, cavity, V("fat") + 10)
    # Ribs: bands in the body wall just outside the cavity, sloping down anteriorly; the lower
    # (floating) ribs stop short of the front. Bone, unlabelled.
    rng = part("ribs")
    pitch_rib = rng.uniform(28, 36)
    wall_shell = (rc >= 1.0) & (rc < 1.0 + 9.0 / ai)
    for k in range(14):
        z0 = acq["top_mm"] + 40 - k * pitch_rib + rng.uniform(-4, 4)
        if z0 < -0.45 * T:
            break
        box = g.box((0.0, 0.0, z0 - 0.35 * b), (a, b, 0.35 * b + 10))
        if box is None:
            continue
        qx, qy, qz = g.q(box)
        m = wall_shell[box] & (np.abs(qz - (z0 - 0.35 * (qy + b))) < 5) & ~((qy > 0) & (np.abs(qx) < 0.3 * a))
        if z0 < -0.1 * T:
            m &= qy < 0.2 * b
        cv.paint(box, m, rng.uniform(380, 520), 0)
    table = (g.qy < -b * 0.93 - 12) & (g.qy > -b * 0.93 - 22) & (np.abs(g.qx) < 0.9 * a)
    cv.paint(full, table, V("table"))

    # Diaphragm domes: z of the lung base at (x, y); right dome higher than left.
    zr, zl = 0.0, -rng.uniform(8, 22)

    def dome(qx, qy):
        def one(z0, xc):
            return z0 - 55 * (((qx - xc) / (0.55 * ai)) ** 2 + ((qy + 0.1 * bi) / (0.9 * bi)) ** 2)
        return np.maximum(one(zr, 0.45 * ai), one(zl, -0.45 * ai))

    zdome = dome(g.qx, g.qy)
    below = g.qz < zdome - 5
    # Diaphragm muscle band and paraspinal / psoas muscles.
    cv.paint(full, cavity & (g.qz >= zdome - 5) & (g.qz < zdome), V("muscle"))
    spine_y = -bi + 0.35 * bi
    for side in (-1, 1):
        ps = _Shape(rng, (side * 0.17 * ai, spine_y - 0.35 * bi, -0.3 * T), (0.14 * ai, 0.2 * bi, 0.9 * T), bumpiness=0.05)
        box = ps.box(g)
        if box:
            cv.paint(box, (ps.rho(g, box) < 1) & (g.qy[box] < spine_y - 0.12 * bi), V("muscle"))
        psoas = _tube_mask(g, full, np.array([[side * 30, spine_y, -0.35 * T], [side * 45, spine_y + 5, -0.65 * T],
                                               [side * 60, spine_y + 25, -0.95 * T]]), np.array([8.0, 18, 22]))
        cv.paint(full, (psoas < 1) & cavity & below, V("muscle"))

    # --- bowel, colon and ascites (background tissue, no label) -------------------------
    rng = part("bowel")
    sbo = f["bowel_obstruction"]
    loop_d = x["bowel_obstruction"]["max_loop_diameter_mm"] if sbo else 0
    n_loops = int(rng.integers(14, 24)) + (8 if sbo else 0)
    for _ in range(n_loops):
        c = (rng.uniform(-0.6, 0.6) * ai, rng.uniform(-0.2, 0.7) * bi, rng.uniform(-0.95, -0.35) * T)
        r = (rng.uniform(0.7, 1.0) * loop_d / 2) if sbo else rng.uniform(8, 14)
        s = _Shape(rng, c, (r, r * rng.uniform(0.8, 1.2), r * rng.uniform(1.2, 2.5)), rot_deg=60, bumpiness=0.1)
        box = s.box(g)
        if box is None:
            continue
        rho = s.rho(g, box)
        inside = (rho < 1) & cavity[box] & below[box]
        content = rng.choice(["fluid", "gas", "stool"], p=[0.75, 0.0, 0.25] if sbo else [0.5, 0.25, 0.25])
        cv.paint(box, inside, V("bowel_wall"))
        lumen = inside & (rho < 1 - 3.0 / r)
        if content == "stool":
            cv.paint(box, lumen, np.float32(-150) + np.float32(120) * rng.standard_normal(lumen.shape).astype(np.float32))
        else:
            cv.paint(box, lumen, V("fluid") + 10 if content == "fluid" else V("gas"))
        if sbo or content == "gas":  # supine: gas rises anteriorly, air-fluid level
            level = s.center[1] + (0.45 if sbo else -0.2) * r
            cv.paint(box, lumen & (g.qy[box] > level), V("gas"))
    for side in (-1, 1):  # ascending (right, +x) and descending (left) colon
        r = 8.0 if sbo else rng.uniform(16, 24)
        pts = np.array([[side * 0.68 * ai, -0.1 * bi, -0.75 * T], [side * 0.7 * ai, 0.0, -0.4 * T], [side * 0.55 * ai, 0.3 * bi, -0.3 * T]])
        box = _polyline_box(g, pts, np.array([r] * 3))
        if box:
            m = (_tube_mask(g, box, pts, np.array([r] * 3)) < 1) & cavity[box] & below[box]
            cv.paint(box, m, V("bowel_wall"))
            if not sbo:
                cv.paint(box, m & (_tube_mask(g, box, pts, np.array([r - 3] * 3)) < 1), V("gas") if rng.random() < 0.5 else -120.0)
    if f["ascites"]:
        t = x["ascites"]["thickness_mm"]
        band = cavity & (rc > 1 - t / ai) & (g.qy > spine_y + 0.15 * bi) & below & (g.qz > -T)
        pelvis = cavity & below & (g.qz < -0.85 * T) & (g.qy > spine_y) & (np.abs(g.qx) < 0.2 * ai + t)
        cv.paint(full, band | pelvis, V("fluid"))

    # --- thorax: lungs, effusions, heart -------------------------------------------------
    for side, name in ((1, "lung_right"), (-1, "lung_left")):
        m = cavity & (g.qz > zdome) & (side * g.qx > 12)
        cv.paint(full, m, V("lung"), L[name])
        if f["pleural_effusion"] and x["pleural_effusion"]["laterality"] in (("right",) if side > 0 else ("left",)) + ("bilateral",):
            depth = x["pleural_effusion"]["depth_mm"]
            post = -bi * np.sqrt(np.clip(1 - (g.qx / ai) ** 2, 0, 1))
            cv.paint(full, m & (g.qy < post + depth), V("fluid"), 0)
    rng = part("heart")
    heart_d = rng.uniform(112, 138)
    if f["cardiomegaly"]:
        heart_d = x["cardiomegaly"]["transverse_diameter_mm"]
    heart = _Shape(rng, (-0.1 * ai, 0.25 * bi, zl + 0.3 * heart_d), (heart_d / 2, heart_d * 0.4, heart_d * 0.45), rot_deg=15)
    box = heart.box(g)
    if box:
        rho = heart.rho(g, box)
        m = (rho < 1) & cavity[box] & (g.qz[box] > zdome[box] - 4)
        cv.paint(box, m, V("myocardium"), L["heart"])
        cv.paint(box, m & (rho < 0.78), V("blood_arterial"))

    # --- liver, lesions, gallbladder ------------------------------------------------------
    rng = part("liver")
    span = rng.uniform(135, 170)
    if f["hepatomegaly"]:
        span = x["hepatomegaly"]["craniocaudal_span_mm"]
    cirr = f["cirrhosis"]
    atrophy = cirr and x["cirrhosis"]["right_lobe_atrophy"]
    rs = 0.82 if atrophy else 1.0
    # The dome clips the top 5 mm; centre the lobe so the stated span lies below it.
    right = _Shape(rng, (0.42 * ai, 0.05 * bi, zr - 6 - span / 2), (0.5 * ai * rs, 0.72 * bi * rs, span / 2),
                   bumpiness=0.07, nodular=0.025 if cirr else 0.0)
    left = _Shape(rng, (-0.05 * ai, 0.42 * bi, zr - 0.28 * span), (0.38 * ai, 0.3 * bi, 0.22 * span * (1.2 if cirr else 1.0)),
                  rot_deg=10, nodular=0.025 if cirr else 0.0)
    liver_hu = V("liver")
    if f["hepatic_steatosis"]:
        liver_hu = x["hepatic_steatosis"]["liver_hu_noncontrast"] + (V("liver") - _HU["liver"][0])
    liver_hu += rng.normal(0, 3)
    for s in (right, left):
        box = s.box(g)
        if box:
            cv.paint(box, (s.rho(g, box) < 1) & cavity[box] & below[box], liver_hu, L["liver"])
    if f["liver_lesion"]:
        rng = part("liver_lesion")
        les = x["liver_lesion"]
        for d, lobe in zip(les["diameters_mm"], les["lobes"]):
            host = right if lobe == "right" else left
            dirn = rng.normal(size=3)
            p = host.point(dirn / np.linalg.norm(dirn) * rng.uniform(0.0, 0.45))
            _sphere(cv, g, rng, p, d, liver_hu - les["hu_below_liver"], liver_hu, restrict_label=L["liver"])
    rng = part("gallbladder")
    gb = _Shape(rng, (0.3 * ai, 0.45 * bi, zr - 0.75 * span), (16, 18, 36), rot_deg=25)
    box = gb.box(g)
    if box:
        rho = gb.rho(g, box)
        cv.paint(box, (rho < 1) & cavity[box] & below[box], V("muscle"), L["gallbladder"])
        cv.paint(box, (rho < 0.85) & cavity[box] & below[box], V("bile"))
        if f["gallstones"]:
            rng = part("gallstones")
            st = x["gallstones"]
            sizes = [st["largest_mm"]] + list(rng.uniform(2, st["largest_mm"], size=st["count"] - 1))
            for d in sizes:
                p = gb.point((rng.uniform(-0.3, 0.3), rng.uniform(-0.5, -0.1), rng.uniform(-0.6, 0.0)))
                _sphere(cv, g, rng, p, d, st["hu"], V("bile"), L["gallbladder"])

    # --- spleen, stomach, pancreas ----------------------------------------------------------
    rng = part("spleen")
    slen = rng.uniform(85, 120)
    if f["splenomegaly"]:
        slen = x["splenomegaly"]["length_mm"]
    sp = _Shape(rng, (-0.62 * ai, -0.3 * bi, zl - 16 - slen / 2),
                (0.17 * ai * (slen / 100) ** 0.5, 0.35 * bi * (slen / 100) ** 0.5, slen / 2), rot_deg=18)
    box = sp.box(g)
    if box:
        cv.paint(box, (sp.rho(g, box) < 1) & cavity[box] & below[box], V("spleen") + rng.normal(0, 3), L["spleen"])
    rng = part("stomach")
    st = _Shape(rng, (-0.3 * ai, 0.3 * bi, zl - 0.35 * T * 0.55), (0.3 * ai, 0.3 * bi, 0.2 * T), rot_deg=25)
    box = st.box(g)
    if box:
        rho = st.rho(g, box)
        m = (rho < 1) & cavity[box] & below[box]
        cv.paint(box, m, V("bowel_wall"), L["stomach"])
        lumen = m & (rho < 0.88)
        cv.paint(box, lumen, V("fluid") + 12)
        cv.paint(box, lumen & (g.qy[box] > st.center[1] + rng.uniform(0.1, 0.5) * st.radii[1]), V("gas"))
    pts = np.array([[0.12 * ai, 0.05 * bi, -0.34 * T], [-0.1 * ai, 0.12 * bi, -0.29 * T], [-0.45 * ai, -0.15 * bi, -0.23 * T]])
    rng = part("pancreas")
    pts = pts + rng.normal(0, 4, size=pts.shape)
    rad = np.array([15.0, 11, 9]) * rng.uniform(0.85, 1.15)
    box = _polyline_box(g, pts, rad)
    if box:
        cv.paint(box, (_tube_mask(g, box, pts, rad) < 1) & cavity[box] & below[box], V("pancreas"), L["pancreas"])

    # --- kidneys ---------------------------------------------------------------------------
    kz = -0.38 * T
    for side, name, lat in ((1, "kidney_right", "right"), (-1, "kidney_left", "left")):
        rng = part(name)
        c = (side * 0.42 * ai, spine_y + 0.05 * bi, kz - (12 if side > 0 else 0))
        k = _Shape(rng, c, (rng.uniform(24, 30), rng.uniform(22, 28), rng.uniform(48, 60)), rot_deg=14)
        box = k.box(g)
        if box is None:
            continue
        rho = k.rho(g, box)
        m = (rho < 1) & cavity[box]
        cv.paint(box, m, V("kidney_cortex"), L[name])
        cv.paint(box, m & (rho < 0.72), V("kidney_medulla"))
        sinus_c = k.center + np.array([-side * 0.45 * k.radii[0], 0.1 * k.radii[1], 0])
        hyd = f["hydronephrosis"] and x["hydronephrosis"]["laterality"] in (lat, "bilateral")
        pel = x["hydronephrosis"]["pelvis_diameter_mm"] / 2 if hyd else 6.0
        sinus = _Shape(rng, sinus_c, (max(pel, 9.0), max(pel, 9.0), 25), bumpiness=0.05)
        sb = sinus.box(g)
        if sb is None:
            continue
        srho = sinus.rho(g, sb)
        cv.paint(sb, (srho < 1) & cavity[sb], V("renal_sinus"), L[name])
        cv.paint(sb, (srho < (0.95 if hyd else 0.35)) & cavity[sb], V("urine"), L[name])
        if hyd:  # dilated calyces radiating from the pelvis
            rng = part(name + ":hydronephrosis")
            for ang in np.linspace(-1, 1, 3):
                p = k.center + k.rot @ np.array([-side * 0.1, 0.0, ang * 0.55]) * k.radii
                _sphere(cv, g, rng, p, pel * 0.9, V("urine"), V("kidney_cortex"), L[name])
        if f["renal_cyst"] and x["renal_cyst"]["laterality"] in (lat, "bilateral"):
            rng = part(name + ":cyst")
            cy = x["renal_cyst"]
            zpos = {"upper": 0.65, "interpolar": 0.0, "lower": -0.65}[cy["pole"]]
            p = k.point((side * 0.6, rng.uniform(-0.3, 0.3), zpos))
            _sphere(cv, g, rng, p, cy["largest_mm"], cy["hu"], V("kidney_cortex"), L[name])
        if f["kidney_stone"] and x["kidney_stone"]["laterality"] in (lat, "bilateral"):
            rng = part(name + ":stone")
            ks = x["kidney_stone"]
            where = {"lower pole": (-side * 0.2, 0.0, -0.6), "interpolar": (-side * 0.25, 0.0, 0.0),
                     "renal pelvis": (-side * 0.45, 0.1, 0.0)}
            for j in range(ks["count"]):
                p = k.point(np.array(where[ks["location"]]) + rng.normal(0, 0.08, 3) * (j > 0))
                _sphere(cv, g, rng, p, ks["size_mm"] * (1.0 if j == 0 else 0.7), ks["hu"], V("renal_sinus"), L[name])

    # --- lymph nodes (painted before vessels so vessels stay whole) ---------------------------
    rng = part("nodes")
    nodes = [("retroperitoneal", rng.uniform(4, 8)) for _ in range(int(rng.integers(0, 3)))]  # normal-sized
    if f["lymphadenopathy"]:
        ln = x["lymphadenopathy"]
        nodes += [(ln["station"], d) for d in ln["short_axis_mm"]]
    aorta_x, aorta_y = -0.1 * ai, spine_y + 0.28 * bi
    for station, d in nodes:
        if station == "retroperitoneal":
            c = (aorta_x + rng.choice([-1, 1]) * rng.uniform(18, 30), aorta_y + rng.uniform(-5, 10), rng.uniform(-0.55, -0.35) * T)
        elif station == "mesenteric":
            c = (rng.uniform(-0.2, 0.2) * ai, rng.uniform(0.1, 0.4) * bi, rng.uniform(-0.55, -0.4) * T)
        else:
            c = (rng.choice([-1, 1]) * 0.4 * ai, rng.uniform(-0.1, 0.2) * bi, rng.uniform(-0.85, -0.75) * T)
        s = _Shape(rng, c, (d / 2, d / 2 * 1.15, d / 2 * 1.5), rot_deg=30)
        box = s.box(g)
        if box:
            cv.paint(box, (s.rho(g, box) < 1) & cavity[box], V("node"), 0)

    # --- aorta, iliac arteries, IVC --------------------------------------------------------
    bif = -0.62 * T
    rng = part("aorta")
    r0 = rng.uniform(8.5, 12)
    zs = np.linspace(acq["top_mm"] + 20, bif, 12)
    ax_pts = np.stack([np.full_like(zs, aorta_x), np.where(zs > zl, spine_y + 0.12 * bi, aorta_y), zs], 1)
    ax_r = np.full_like(zs, r0)
    if f["abdominal_aortic_aneurysm"]:
        aa = x["abdominal_aortic_aneurysm"]
        # Infrarenal: from just below the renal arteries (kidney hilum level) to above the bifurcation.
        z_top = kz + 10
        z_bot = max(z_top - aa["length_mm"], bif + 3)
        zs = np.linspace(acq["top_mm"] + 20, bif, 80)
        ax_pts = np.stack([np.full_like(zs, aorta_x), np.where(zs > zl, spine_y + 0.12 * bi, aorta_y), zs], 1)
        t = np.clip((z_top - zs) / max(z_top - z_bot, 1), 0, 1)
        ax_r = r0 + (aa["max_diameter_mm"] / 2 - r0) * np.sin(np.pi * t) ** 2
        ax_pts[:, 1] += (ax_r - r0) * 0.6  # aneurysms bulge anteriorly, away from the spine
    box = _polyline_box(g, ax_pts, ax_r)
    if box:
        dist = _tube_mask(g, box, ax_pts, ax_r)
        cv.paint(box, dist < 1, V("blood_arterial"), L["aorta"])
        if f["abdominal_aortic_aneurysm"] and x["abdominal_aortic_aneurysm"]["mural_thrombus"]:
            lumen_r = np.minimum(ax_r, r0 + 0.45 * (ax_r - r0))
            cv.paint(box, (dist < 1) & (_tube_mask(g, box, ax_pts, lumen_r) >= 1), V("thrombus"), L["aorta"])
    for side in (-1, 1):  # common iliac arteries: drawn, not labelled (not in our label set)
        pts = np.array([[aorta_x, aorta_y, bif + 2], [side * 0.35 * ai, spine_y + 0.1 * bi, -0.95 * T]])
        box = _polyline_box(g, pts, np.array([r0 * 0.7] * 2))
        if box:
            cv.paint(box, (_tube_mask(g, box, pts, np.array([r0 * 0.7] * 2)) < 1) & cavity[box], V("blood_arterial"), 0)
    if f["atherosclerosis"]:
        rng = part("plaques")
        ath = x["atherosclerosis"]
        for _ in range(ath["calcified_plaques"]):
            j = int(rng.integers(len(ax_pts) // 3, len(ax_pts)))
            ang = rng.uniform(0, 2 * np.pi)
            p = ax_pts[j] + np.array([np.cos(ang), np.sin(ang), 0]) * ax_r[j] * 0.95
            _sphere(cv, g, rng, p, rng.uniform(1.5, 4.5), ath["hu"], V("blood_arterial"), L["aorta"])
    ivc_pts = np.array([[0.14 * ai, spine_y + 0.22 * bi, acq["top_mm"] + 20], [0.14 * ai, spine_y + 0.25 * bi, zr - 30],
                        [0.12 * ai, spine_y + 0.24 * bi, bif - 15]])
    rng = part("ivc")
    ivc_r = np.array([13.0, 12, 11]) * rng.uniform(0.85, 1.1)
    box = _polyline_box(g, ivc_pts, ivc_r)
    if box:
        cv.paint(box, (_tube_mask(g, box, ivc_pts, ivc_r) < 1) & cavity[box], V("blood_venous"), L["inferior_vena_cava"])

    # --- spine (vertebral bodies + posterior elements), pelvis ---------------------------------
    pitch = 0.13 * T
    z_s1 = -0.8 * T
    rng = part("spine")
    normal_bone = float(np.clip(270 - 1.6 * (pat["age"] - 30) + rng.normal(0, 15), 140, 300))
    cancellous = x["osteopenia"]["cancellous_hu"] if f["osteopenia"] else normal_bone
    vr = rng.uniform(19, 23)
    for i, level in enumerate(("L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9")):
        zc = z_s1 + (i + 0.5) * pitch
        h = 0.74 * pitch
        if zc - pitch > acq["top_mm"] + 10:
            break
        c = np.array([0.0, spine_y, zc])
        box = g.box(c, np.array([vr + 60, vr + 60, pitch]))
        if box is None:
            continue
        qx, qy, qz = g.q(box)
        dz = qz - zc
        top_lim = np.full(qx.shape, h / 2, dtype=np.float32)
        if f["vertebral_compression_fracture"] and x["vertebral_compression_fracture"]["level"] == level:
            loss = x["vertebral_compression_fracture"]["height_loss_percent"] / 100
            # Anterior wedge: the superior endplate drops most at the front.
            front = np.clip((qy - (spine_y - vr)) / (2 * vr), 0, 1)
            top_lim = np.float32(h / 2) - np.float32(h * loss) * front
        rr = np.sqrt((qx / vr) ** 2 + ((qy - spine_y) / (vr * 0.85)) ** 2)
        body = (rr < 1) & (dz < top_lim) & (dz > -h / 2)
        cv.paint(box, (rr < 1) & (np.abs(dz) < pitch / 2) & ~body, V("disc"), 0)
        cv.paint(box, body, V("cortical_bone"), L["vertebrae"])
        cv.paint(box, body & (rr < 0.82) & (dz < top_lim - 1.5) & (dz > -h / 2 + 1.5), cancellous, L["vertebrae"])
        canal_y = spine_y - vr * 0.85 - 10
        rcan = np.sqrt(qx**2 + (qy - canal_y) ** 2)
        arch = (rcan < 17) & (rcan >= 9) & (qy < spine_y - vr * 0.6) & (np.abs(dz) < h / 2)
        spinous = (np.abs(qx) < 4) & (qy < canal_y - 12) & (qy > canal_y - 45) & (np.abs(dz) < h / 2.5)
        transverse = (np.abs(qx) < 45) & (np.abs(qy - canal_y - 4) < 5) & (np.abs(dz) < h / 3)
        cv.paint(box, (arch | spinous | transverse) & ~(rcan < 9), V("cortical_bone") * 0.7, L["vertebrae"])
        cv.paint(box, (rcan < 9) & (np.abs(dz) < pitch / 2) & (qy < spine_y - vr * 0.7), V("csf"), 0)
    rng = part("pelvis")
    sac = _Shape(rng, (0.0, spine_y - 10, z_s1 - 0.12 * T), (45, 25, 0.13 * T), rot_deg=8)
    box = sac.box(g)
    if box:
        rho = sac.rho(g, box)
        cv.paint(box, rho < 1, V("cortical_bone") * 0.8, 0)
        cv.paint(box, rho < 0.8, cancellous, 0)
    for side in (-1, 1):  # iliac wings
        w = _Shape(rng, (side * 0.62 * ai, spine_y + 0.1 * bi, -0.72 * T), (0.3 * ai, 0.12 * bi, 0.16 * T), rot_deg=15)
        box = w.box(g)
        if box:
            rho = w.rho(g, box)
            cv.paint(box, (rho < 1) & (rho > 0.75), V("cortical_bone"), 0)
            cv.paint(box, rho <= 0.75, cancellous + 20, 0)

    # --- bladder ------------------------------------------------------------------------------
    rng = part("bladder")
    fill = rng.uniform(0.6, 1.2)
    bl = _Shape(rng, (0.0, 0.35 * bi, -T + 38 * fill), (45 * fill, 33 * fill, 32 * fill), rot_deg=10)
    box = bl.box(g)
    if box:
        rho = bl.rho(g, box)
        m = (rho < 1) & cavity[box]
        cv.paint(box, m, V("muscle"), L["urinary_bladder"])
        cv.paint(box, m & (rho < 0.9), V("urine"), L["urinary_bladder"])

    # --- acquisition: tissue texture, blur (PSF and slice thickness), correlated noise -----------
    hu = cv.hu
    rng = part("texture")
    texture = ndimage.gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), sigma=2.5, mode="wrap")
    texture *= np.float32(rng.uniform(3, 7) / max(float(texture.std()), 1e-6))
    soft = (hu > -200) & (hu < 300)
    hu[soft] += texture[soft]
    sigma_z = acq["slice_thickness_factor"] * sz / 2.355 / sz
    hu = ndimage.gaussian_filter(hu, sigma=(0.45, 0.45, max(sigma_z, 0.3)), mode="nearest")
    rng = part("noise")
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=(0.8, 0.8, 0.4), mode="wrap")
    noise *= np.float32(acq["noise_sigma_hu"] / max(float(noise.std()), 1e-6))
    hu = np.clip(hu + noise, -1024, 3071).astype(np.float32)

    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = np.array([px[0], py[0], pz[0]]) + np.asarray(acq["table_offset_mm"])
    return hu, cv.lab, affine
