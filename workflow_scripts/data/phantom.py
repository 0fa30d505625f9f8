"""One phantom chest film: coarse anatomy and a visible sign per finding, drawn from shapes and noise.

THESE IMAGES ARE PHANTOMS FOR TRYING THE PIPELINE, NOT MEDICAL DATA. `draw_phantom` draws one
film; `sample_anatomy` one patient's anatomy, shared by the patient's films. Which findings each
patient has is `workflow_scripts.data.phantom_patients`; the dataset around them (files, the label CSV) is
`workflow_scripts.data.demo_dataset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

LABELS: tuple[str, ...] = (
    "Cardiomegaly",
    "Effusion",
    "Nodule",
    "Mass",
    "Pneumothorax",
    "Fibrosis",
    "Pneumonia",
    "No Finding",
)
FINDINGS: tuple[str, ...] = LABELS[:-1]
NO_FINDING = "No Finding"

# Attenuation scale: the drawing works in "brightness" units where background ~0,
# soft tissue ~0.5 and the sum of everything stays below ~0.85.
_AIR = 0.40  # how much fully aerated lung darkens soft tissue
_VESSEL = 0.13  # brightness of lung markings over aerated lung
_PARENCHYMA = 0.03  # std of the fine lung texture


# --------------------------------------------------------------------------- helpers


def _sig(z: np.ndarray | float) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * np.asarray(z, dtype=np.float64))


def _smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _seg_distance(X: np.ndarray, Y: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distances from every pixel to each segment; p0, p1 are (S, 2) arrays -> (S, H, W)."""
    d = p1 - p0
    len2 = np.maximum((d**2).sum(axis=1), 1e-12)[:, None, None]
    px = X[None] - p0[:, 0, None, None]
    py = Y[None] - p0[:, 1, None, None]
    t = np.clip((px * d[:, 0, None, None] + py * d[:, 1, None, None]) / len2, 0.0, 1.0)
    return np.hypot(px - t * d[:, 0, None, None], py - t * d[:, 1, None, None])


def _check_labels(labels: Sequence[str]) -> list[str]:
    if isinstance(labels, str):
        labels = [labels]
    labels = list(labels)
    unknown = [label for label in labels if label not in LABELS]
    if unknown:
        raise ValueError(f"unknown label(s) {unknown}; known labels are {list(LABELS)}")
    if NO_FINDING in labels and len(set(labels)) > 1:
        raise ValueError(f"'{NO_FINDING}' cannot be combined with findings {labels}")
    return [label for label in LABELS if label in labels]


# --------------------------------------------------------------------------- anatomy


def sample_anatomy(rng: np.random.Generator) -> dict[str, Any]:
    """Per-patient anatomy: sizes and positions in image fractions, display settings, seeds.

    All films of one patient share this dict (films then differ by small positioning,
    inspiration, exposure and noise changes drawn in :func:`draw_phantom`).
    """
    u = rng.uniform
    return {
        "cx": 0.5 + u(-0.02, 0.02),  # midline
        "lung_top": 0.16 + u(-0.02, 0.02),  # apex height
        "diaphragm": 0.78 + u(-0.03, 0.02),  # costophrenic angle height
        "lung_width": 0.30 + u(-0.025, 0.025),  # width of one lung at its base
        "gap": 0.055 + u(-0.008, 0.008),  # half-width of the upper mediastinum
        "dome": 0.065 + u(-0.015, 0.015),  # diaphragm dome height
        "body_hw": 0.47 + u(-0.03, 0.02),  # half-width of the body outline
        "ctr": u(0.42, 0.48),  # cardiothoracic ratio (normal)
        "heart_cy": 0.645 + u(-0.015, 0.015),
        "heart_hh": 0.12 + u(-0.01, 0.01),
        "rib_curve": 0.2 + u(-0.03, 0.03),
        "n_ribs": 9.5 + u(-0.5, 0.5),
        "rib_phase": u(0.0, 1.0),
        "clavicle_y": 0.05 + u(-0.015, 0.015),  # medial clavicle end below the apex
        "contrast": u(0.9, 1.1),
        "brightness": u(-0.04, 0.04),
        "gamma": u(0.85, 1.15),
        "noise": u(0.010, 0.022),
        "vessel_seed": int(rng.integers(0, 2**31 - 1)),
        "lesion_seed": int(rng.integers(0, 2**31 - 1)),
    }


def _film_jitter(rng: np.random.Generator) -> dict[str, float]:
    u = rng.uniform
    return {
        "dx": u(-0.006, 0.006),
        "dy": u(-0.006, 0.006),
        "angle": u(-0.02, 0.02),  # radians
        "inspiration": u(-0.015, 0.015),  # moves the diaphragm
        "exposure": u(-0.015, 0.015),
        "contrast": u(0.97, 1.03),
    }


_NO_JITTER = {"dx": 0.0, "dy": 0.0, "angle": 0.0, "inspiration": 0.0, "exposure": 0.0, "contrast": 1.0}


class _Geometry:
    """Coordinate grids and lung/heart shapes for one film (image fractions, y downwards)."""

    def __init__(self, size: int, anatomy: dict[str, Any], film: dict[str, float]) -> None:
        self.size = size
        self.eps = 0.7 / size  # edge softness: about 0.7 px
        coords = (np.arange(size, dtype=np.float64) + 0.5) / size - 0.5
        yy, xx = np.meshgrid(coords, coords, indexing="ij")
        c, s = np.cos(film["angle"]), np.sin(film["angle"])
        self.X = c * xx + s * yy + 0.5 - film["dx"]
        self.Y = -s * xx + c * yy + 0.5 - film["dy"]
        self._film = film
        a = anatomy
        self.cx = a["cx"]
        self.top = a["lung_top"]
        self.gap = a["gap"]
        self.lw = a["lung_width"]
        self.half_thorax = a["gap"] + a["lung_width"]
        base = a["diaphragm"] + film["inspiration"]
        # side -1 = image left = patient's right (hemidiaphragm higher), +1 = image right
        self.bottom = {-1: base - 0.012, 1: base + 0.012}
        self.lung: dict[int, np.ndarray] = {}
        self.t: dict[int, np.ndarray] = {}  # 0 at the apex, 1 at the costophrenic angle
        self.hw: dict[int, np.ndarray] = {}  # lung half-width at each row
        self.xc: dict[int, float] = {}
        self.dome_y: dict[int, np.ndarray] = {}
        for side in (-1, 1):
            self._lung(side, a["dome"])
        self.air = self.lung[-1] + self.lung[1]
        self.heart = self._heart(a["ctr"], a["heart_cy"], a["heart_hh"])

    def to_pixel(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Anatomy coordinates -> (column, row) pixel coordinates (inverse of the film transform)."""
        c, s = np.cos(self._film["angle"]), np.sin(self._film["angle"])
        u, v = x - 0.5 + self._film["dx"], y - 0.5 + self._film["dy"]
        xx, yy = c * u - s * v, s * u + c * v
        return (xx + 0.5) * self.size - 0.5, (yy + 0.5) * self.size - 0.5

    def soft(self, d: np.ndarray | float) -> np.ndarray:
        return _sig(np.asarray(d) / self.eps)

    def _lung(self, side: int, dome: float) -> None:
        X, Y = self.X, self.Y
        top, bottom = self.top, self.bottom[side]
        xc = self.cx + side * (self.gap + self.lw / 2)
        t = (Y - top) / (bottom - top)
        ta = np.clip(t / 0.5, 0.0, 1.0)
        profile = np.sqrt(np.clip(1.0 - (1.0 - ta) ** 2, 0.0, 1.0))  # rounded apex
        hw = (self.lw / 2) * profile * (0.88 + 0.12 * np.clip(t, 0.0, 1.0))
        xr = (X - xc) / (self.lw / 2)
        dome_y = bottom - dome * (1.0 - np.clip((xr + side * 0.1) / 1.1, -1.0, 1.0) ** 2)
        self.lung[side] = self.soft(hw - np.abs(X - xc)) * self.soft(dome_y - Y) * self.soft(Y - top)
        self.t[side], self.hw[side], self.xc[side], self.dome_y[side] = t, hw, xc, dome_y

    def _heart(self, ctr: float, cy: float, hh: float) -> np.ndarray:
        width = ctr * 2 * self.half_thorax
        xh = self.cx + 0.1 * width  # a third of the heart right of the midline, two thirds left
        dx = self.X - xh
        dxn = np.where(dx > 0, dx / (0.57 * width), dx / (0.43 * width))
        dy = (self.Y - cy - 0.18 * dx) / hh  # long axis tilted down to the patient's left
        r = np.sqrt(dxn**2 + dy**2)
        return _sig((1.0 - r) / (self.eps / (0.5 * width)))

    def lateral_fraction(self, side: int) -> np.ndarray:
        """0 at the lung's medial edge, 1 at its lateral edge (per row)."""
        hw = np.maximum(self.hw[side], 1e-6)
        return np.clip((side * (self.X - self.xc[side]) + hw) / (2 * hw), 0.0, 1.0)


def anatomy_masks(size: int, anatomy: dict[str, Any]) -> dict[str, np.ndarray]:
    """Soft masks (0..1, float) of the lungs and heart for *anatomy* without film jitter.

    Keys: ``lung_right`` (image left), ``lung_left`` (image right), ``lungs``, ``heart``.
    Handy for checks; films drawn by :func:`draw_phantom` are shifted by at most ~2 %.
    """
    g = _Geometry(size, anatomy, _NO_JITTER)
    return {"lung_right": g.lung[-1], "lung_left": g.lung[1], "lungs": g.air, "heart": g.heart}


# --------------------------------------------------------------------------- structures


def _vessel_tree(g: _Geometry, rng: np.random.Generator) -> np.ndarray:
    """Branching vessel/bronchial markings radiating from both hila (brightness 0..~1)."""
    starts, ends, widths = [], [], []
    for side in (-1, 1):
        hilum = np.array([g.cx + side * (g.gap + 0.035), g.top + 0.47 * (g.bottom[side] - g.top)])
        trunks = np.deg2rad(np.array([-70.0, -35.0, -5.0, 25.0, 55.0, 80.0]) + rng.uniform(-8, 8, 6))
        stack = [(hilum, a, 0.095 * rng.uniform(0.85, 1.15), 0.0055, 0) for a in trunks]
        while stack:
            p, ang, length, width, depth = stack.pop()
            direction = np.array([side * np.cos(ang), np.sin(ang)])
            q = p + length * direction
            starts.append(p)
            ends.append(q)
            widths.append(width)
            if depth < 4:
                for sign in (-1, 1):
                    child = ang + sign * rng.uniform(0.25, 0.55)
                    stack.append((q, child, length * rng.uniform(0.62, 0.82), width * 0.72, depth + 1))
    p0, p1 = np.array(starts), np.array(ends)
    w = np.maximum(np.array(widths) * g.size, 0.55) / g.size  # at least ~half a pixel
    amp = np.clip(np.array(widths) / 0.0055, 0.35, 1.0)
    out = np.zeros_like(g.X)
    # each segment only touches a small box of pixels around it
    c0, r0 = g.to_pixel(p0[:, 0], p0[:, 1])
    c1, r1 = g.to_pixel(p1[:, 0], p1[:, 1])
    reach = 3.5 * w * g.size + 1.5
    lo_c = np.clip(np.floor(np.minimum(c0, c1) - reach), 0, g.size).astype(int)
    hi_c = np.clip(np.ceil(np.maximum(c0, c1) + reach) + 1, 0, g.size).astype(int)
    lo_r = np.clip(np.floor(np.minimum(r0, r1) - reach), 0, g.size).astype(int)
    hi_r = np.clip(np.ceil(np.maximum(r0, r1) + reach) + 1, 0, g.size).astype(int)
    for i in range(len(p0)):
        if lo_c[i] >= hi_c[i] or lo_r[i] >= hi_r[i]:
            continue
        box = (slice(lo_r[i], hi_r[i]), slice(lo_c[i], hi_c[i]))
        d = _seg_distance(g.X[box], g.Y[box], p0[i : i + 1], p1[i : i + 1])[0]
        np.maximum(out[box], amp[i] * np.exp(-0.5 * (d / w[i]) ** 2), out=out[box])
    return out


def _ribs(g: _Geometry, a: dict[str, Any]) -> np.ndarray:
    out = np.zeros_like(g.X)
    span = max(g.bottom[-1], g.bottom[1]) - g.top + 0.05
    for side in (-1, 1):
        u = side * (g.X - g.cx) / g.half_thorax  # 0 at the spine, 1 at the lateral chest wall
        region = g.soft(u - 0.04) * g.soft(1.1 - u)
        region = region * g.soft(g.Y - (g.top - 0.05)) * g.soft(g.bottom[side] + 0.02 - g.Y)
        # posterior ribs: rise a little next to the spine, then curve down laterally
        curve = a["rib_curve"] * (u**2 - 0.35 * u)
        q = np.clip((g.Y - g.top + 0.05 - curve) / span, 0.0, 1.5)
        phase = a["n_ribs"] * q**0.9 + a["rib_phase"]
        band = _smoothstep(0.3, 0.9, 0.5 + 0.5 * np.cos(2 * np.pi * phase))
        out += band * region
        # faint anterior ribs: run from high laterally down towards the middle
        curve_a = -0.16 * (1.0 - u) ** 2
        qa = np.clip((g.Y - g.top - curve_a) / span, 0.0, 1.5)
        band_a = _smoothstep(0.6, 0.85, 0.5 + 0.5 * np.cos(2 * np.pi * (0.8 * a["n_ribs"] * qa + 0.3)))
        out += 0.35 * band_a * region * _smoothstep(0.3, 0.55, u)
    return out


def _clavicles(g: _Geometry, a: dict[str, Any]) -> np.ndarray:
    p0, p1 = [], []
    for side in (-1, 1):
        p0.append([g.cx + side * 0.04, g.top + a["clavicle_y"]])
        p1.append([g.cx + side * 0.31, g.top - 0.015])
    p0, p1 = np.array(p0), np.array(p1)
    # a gentle S-shape: bend the field before measuring distance to the straight segment
    bend = 0.012 * np.sin(2 * np.pi * np.clip(np.abs(g.X - g.cx) / 0.31, 0, 1))
    d = _seg_distance(g.X, g.Y + bend, p0, p1).min(axis=0)
    return _smoothstep(0.018, 0.008, d)


# --------------------------------------------------------------------------- findings


def _lung_point(g: _Geometry, rng: np.random.Generator, side: int, t_range, lat_range) -> tuple[float, float]:
    """A point inside lung *side* at relative height t and lateral fraction (no jitter)."""
    t = rng.uniform(*t_range)
    y = g.top + t * (g.bottom[side] - g.top)
    tp = min(t / 0.5, 1.0)
    hw = (g.lw / 2) * np.sqrt(max(1.0 - (1.0 - tp) ** 2, 0.0)) * (0.88 + 0.12 * t)
    f = rng.uniform(*lat_range)
    x = g.xc[side] + side * (2 * f - 1) * hw
    return float(x), float(y)


def _blob(g: _Geometry, x: float, y: float, r: float, rng: np.random.Generator, lobulation: float) -> np.ndarray:
    dx, dy = g.X - x, g.Y - y
    theta = np.arctan2(dy, dx)
    rr = r * (
        1.0
        + lobulation * np.sin(3 * theta + rng.uniform(0, 2 * np.pi))
        + 0.6 * lobulation * np.sin(5 * theta + rng.uniform(0, 2 * np.pi))
    )
    return g.soft((rr - np.hypot(dx, dy)) * 0.6)


def _cardiomegaly(g: _Geometry, a: dict[str, Any], rng: np.random.Generator) -> None:
    g.heart = g._heart(rng.uniform(0.6, 0.68), a["heart_cy"] + 0.01, a["heart_hh"] * 1.12)


def _effusion(g: _Geometry, rng: np.random.Generator) -> np.ndarray:
    sides = [int(rng.choice([-1, 1]))] if rng.random() < 0.7 else [-1, 1]
    op = np.zeros_like(g.X)
    for side in sides:
        height = rng.uniform(0.22, 0.34) * (g.bottom[side] - g.top)
        lat = g.lateral_fraction(side)
        # meniscus: the fluid level climbs up the lateral chest wall
        level = g.bottom[side] - height * (0.45 + 0.55 * lat**2)
        edge = 0.008 + 0.004 * rng.random()  # hazy upper border
        op = np.maximum(op, _sig((g.Y - level) / edge) * (g.Y < g.bottom[side] + 0.1))
    return 0.95 * op


def _nodule(g: _Geometry, rng: np.random.Generator) -> np.ndarray:
    op = np.zeros_like(g.X)
    n = int(rng.choice([1, 1, 1, 2, 3]))
    for _ in range(n):
        side = int(rng.choice([-1, 1]))
        x, y = _lung_point(g, rng, side, (0.2, 0.75), (0.3, 0.85))
        r = max(rng.uniform(0.028, 0.038), 2.4 / g.size)  # a few px at the demo classifier's 64 px
        op = np.maximum(op, _blob(g, x, y, r, rng, 0.04))
    return 0.95 * op


def _mass(g: _Geometry, rng: np.random.Generator) -> np.ndarray:
    side = int(rng.choice([-1, 1]))
    x, y = _lung_point(g, rng, side, (0.3, 0.6), (0.4, 0.65))
    r = rng.uniform(0.065, 0.085)
    return 0.9 * _blob(g, x, y, r, rng, 0.1)


def _pneumothorax(g: _Geometry, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """(marking-free region, pleural line, side).

    The collapsed lung is the lung shape pulled away from the apex and lateral chest wall;
    between its edge (the pleural line) and the wall there is only air.
    """
    side = int(rng.choice([-1, 1]))
    depth0 = rng.uniform(0.07, 0.1)
    top_c = g.top + 1.3 * depth0
    t_c = (g.Y - top_c) / (g.bottom[side] - top_c)
    depth = depth0 * (1.0 - _smoothstep(0.5, 0.95, t_c))
    ta = np.clip(t_c / 0.5, 0.0, 1.0)
    profile = np.sqrt(np.clip(1.0 - (1.0 - ta) ** 2, 0.0, 1.0))
    hw_c = (g.lw / 2 - depth / 2) * profile * (0.88 + 0.12 * np.clip(t_c, 0.0, 1.0))
    xc_c = g.xc[side] - side * depth / 2
    lung = g.lung[side]
    collapsed = g.soft(hw_c - np.abs(g.X - xc_c)) * g.soft(g.Y - top_c)
    region = lung * (1.0 - collapsed)
    line_eps = max(0.45 / g.size, 0.0025)
    edge = _sig((hw_c - np.abs(g.X - xc_c)) / line_eps) * _sig((g.Y - top_c) / line_eps)
    line = lung * 4.0 * edge * (1.0 - edge) * _smoothstep(0.005, 0.02, depth + (t_c < 0.2))
    return region, line, side


def _fibrosis(g: _Geometry, rng: np.random.Generator) -> np.ndarray:
    px = g.size / 128.0
    white = rng.standard_normal(g.X.shape)
    band = gaussian_filter(white, 1.1 * px) - gaussian_filter(white, 2.8 * px)
    band /= band.std() + 1e-12
    net = np.exp(-((band / 0.45) ** 2))  # thin lines along the zero crossings: a net
    weight = np.zeros_like(g.X)
    for side in (-1, 1):
        basal = _smoothstep(0.15, 0.85, g.t[side])
        peripheral = 0.4 + 0.6 * g.lateral_fraction(side)
        weight += g.lung[side] * (0.35 + 0.65 * basal) * peripheral
    return net * weight


def _pneumonia(g: _Geometry, rng: np.random.Generator) -> np.ndarray:
    side = int(rng.choice([-1, 1]))
    zone = rng.choice(["upper", "middle", "lower"], p=[0.25, 0.25, 0.5])
    t_range = {"upper": (0.22, 0.32), "middle": (0.45, 0.55), "lower": (0.66, 0.74)}[zone]
    x, y = _lung_point(g, rng, side, t_range, (0.4, 0.65))
    field = np.zeros_like(g.X)
    for _ in range(int(rng.integers(4, 7))):  # a cluster of fuzzy patches in one zone
        bx, by = x + rng.normal(0, 0.045), y + rng.normal(0, 0.03)
        sx, sy = rng.uniform(0.03, 0.05), rng.uniform(0.022, 0.04)
        field += rng.uniform(0.6, 1.0) * np.exp(-0.5 * (((g.X - bx) / sx) ** 2 + ((g.Y - by) / sy) ** 2))
    px = g.size / 128.0
    mottle = gaussian_filter(rng.standard_normal(g.X.shape), 1.5 * px)
    mottle /= mottle.std() + 1e-12
    op = _smoothstep(0.05, 1.1, gaussian_filter(field * (1.0 + 0.4 * mottle), 0.8 * px))
    return 0.8 * op * g.lung[side]


# --------------------------------------------------------------------------- drawing


def draw_phantom(
    labels: Sequence[str],
    size: int,
    rng: np.random.Generator,
    patient_anatomy: dict[str, Any] | None = None,
) -> np.ndarray:
    """Draw one phantom frontal chest film as a ``uint8`` array of shape ``(size, size)``.

    *labels* is a subset of :data:`LABELS` (empty or ``["No Finding"]`` = normal).
    *rng* drives everything that varies from film to film (positioning, inspiration,
    exposure, noise); *patient_anatomy* (from :func:`sample_anatomy`) fixes the patient's
    anatomy and where the findings sit, so films of one patient look alike. Without it the
    anatomy is drawn from *rng*; a partial dict overrides only the keys it has. The rng
    draws a fixed number of seeds up front, so the same rng state gives the same film up
    to the findings: with and without a label, anatomy, positioning and noise are identical.
    Raises ValueError for a label outside :data:`LABELS`.
    """
    wanted = set(_check_labels(labels))
    size = int(size)
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    anatomy_seed, film_seed, noise_seed = (int(s) for s in rng.integers(0, 2**63 - 1, size=3))
    a = sample_anatomy(np.random.default_rng(anatomy_seed))
    if patient_anatomy is not None:
        a.update(patient_anatomy)
    film = _film_jitter(np.random.default_rng(film_seed))
    g = _Geometry(size, a, film)

    def lesion_rng(label: str) -> np.random.Generator:
        # where a finding sits is a patient property (films only move it with the patient)
        return np.random.default_rng([a["lesion_seed"], LABELS.index(label)])

    if "Cardiomegaly" in wanted:
        _cardiomegaly(g, a, lesion_rng("Cardiomegaly"))

    X, Y, cx = g.X, g.Y, g.cx
    # body outline: neck at the top, shoulders, chest
    bw = 0.14 + (a["body_hw"] - 0.14) * _sig((Y - (g.top - 0.08)) / 0.03)
    body = g.soft(bw - np.abs(X - cx))
    tissue = 0.46 * body * (0.92 + 0.16 * np.clip(Y, 0, 1))
    # upper abdomen (liver/spleen) below the diaphragm is denser
    below = np.where(X < cx, g.soft(Y - g.dome_y[-1]), g.soft(Y - g.dome_y[1]))
    tissue += 0.07 * body * below * _smoothstep(g.top + 0.3, g.top + 0.45, Y)
    # gastric air bubble under the left hemidiaphragm (image right)
    gx, gy = cx + 0.17, g.bottom[1] + 0.045
    tissue -= 0.12 * np.exp(-0.5 * (((X - gx) / 0.045) ** 2 + ((Y - gy) / 0.022) ** 2)) * below
    # humeral heads at the top corners
    for side in (-1, 1):
        hx, hy = cx + side * (a["body_hw"] - 0.005), g.top - 0.01
        tissue += 0.12 * g.soft(0.065 - np.hypot(X - hx, Y - hy)) * body

    ribs = _ribs(g, a)
    bone = 0.15 * _clavicles(g, a)
    spine = g.soft(0.03 - np.abs(X - cx)) * (0.06 + 0.015 * np.cos(2 * np.pi * Y / 0.055))
    bone += spine * body
    # aortic knob on the patient's left of the upper mediastinum
    aorta = g.soft(1.0 - np.hypot((X - cx - 0.065) / 0.035, (Y - g.top - 0.2) / 0.03) * 1.0)
    # trachea: a dark air column down the midline to the carina
    trachea = g.soft(0.017 - np.abs(X - cx)) * g.soft(g.top + 0.24 - Y) * body

    # lung opacities from findings (fraction of air replaced by fluid/tissue)
    opacity = np.zeros_like(X)

    def add(op: np.ndarray) -> None:
        nonlocal opacity
        opacity = 1.0 - (1.0 - opacity) * (1.0 - np.clip(op, 0.0, 1.0))

    ptx_region = np.zeros_like(X)
    ptx_line = np.zeros_like(X)
    if "Effusion" in wanted:
        add(_effusion(g, lesion_rng("Effusion")))
    if "Nodule" in wanted:
        add(_nodule(g, lesion_rng("Nodule")))
    if "Mass" in wanted:
        add(_mass(g, lesion_rng("Mass")))
    if "Pneumonia" in wanted:
        add(_pneumonia(g, lesion_rng("Pneumonia")))
    if "Pneumothorax" in wanted:
        ptx_region, ptx_line, _ = _pneumothorax(g, lesion_rng("Pneumothorax"))

    air = g.air * (1.0 - 0.9 * g.heart) * (1.0 - 0.8 * aorta)
    bone += 0.085 * ribs * (0.25 + 0.75 * air)  # ribs stand out against aerated lung
    aerated = air * (1.0 - opacity)
    vessels = _vessel_tree(g, np.random.default_rng(a["vessel_seed"]))
    hila = sum(
        np.exp(-0.5 * (((X - cx - s * (g.gap + 0.03)) / 0.025) ** 2 + ((Y - g.top - 0.3) / 0.05) ** 2))
        for s in (-1, 1)
    )
    # fine interstitial texture of normal lung (gone where the lung has collapsed away)
    px = size / 128.0
    white = np.random.default_rng([a["vessel_seed"], 1]).standard_normal((size, size))
    parenchyma = gaussian_filter(white, 0.8 * px) - gaussian_filter(white, 2.0 * px)
    parenchyma /= parenchyma.std() + 1e-12
    markings = (_VESSEL * vessels + _PARENCHYMA * parenchyma) * (1.0 - ptx_region) + 0.06 * hila

    A = tissue + bone + 0.05 * g.heart * body - _AIR * aerated - 0.1 * trachea
    A += markings * aerated
    A -= 0.1 * ptx_region * air  # no lung tissue at all: a little darker still
    A += 0.14 * ptx_line
    if "Fibrosis" in wanted:
        A += 0.2 * _fibrosis(g, lesion_rng("Fibrosis")) * aerated

    # display: blur slightly (focal spot), window, gamma, exposure, quantum noise
    A = gaussian_filter(A, 0.45 * px)
    v = np.clip(A / 0.8, 0.0, 1.0) ** a["gamma"]
    v = 0.5 + (v - 0.5) * a["contrast"] * film["contrast"] + a["brightness"] + film["exposure"]
    noise = np.random.default_rng(noise_seed).standard_normal((size, size))
    v = v + a["noise"] * gaussian_filter(noise, 0.5) * 1.6
    return np.clip(np.rint(v * 255.0), 0, 255).astype(np.uint8)
