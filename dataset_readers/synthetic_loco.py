"""Built-in synthetic dataset in the exact MVTec LOCO AD layout, so the pipeline runs without any download.

Two categories whose normal images obey logical rules:
- synth_box: a box with three compartments; left: 2 red discs, right-top: 1 blue square, right-bottom: 3 yellow dots.
- synth_bottle: a bottle whose fill colour and label colour form one of three allowed pairs; the label sits at a
  fixed height and the fill level is fixed.
Normal images vary in position, rotation, lighting, colour and noise. Every image is drawn in a canonical frame
(opencv primitives and numpy masks, no per-pixel loops), then the image, its defect masks and its component class
map are warped with the same random pose, so masks and maps stay aligned with the pixels.

Layout written under <root>/<category>/ (as MVTec LOCO):
  train/good, validation/good, test/{good,logical_anomalies,structural_anomalies}/NNN.png,
  ground_truth/<type>/NNN/KKK.png (one PNG per defect, its single positive value = the defect's pixel_value),
  defects_config.json, synthetic_info.json (generation parameters; written last, marks the folder complete),
  component_maps/<split>/<defect_type>/NNN.png when asked (0 background, 1..4 component kind, see CLASS_NAMES).

Run: python -m dataset_readers.synthetic_loco [--root datasets/synthetic_loco] [--size 256] [--component-maps]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from tqdm import tqdm

from common.runtime import get_logger
from .base import DatasetError
from .registry import REPO_ROOT, SYNTHETIC_CATEGORIES

DEFAULT_ROOT = REPO_ROOT / "datasets" / "synthetic_loco"
INFO_FILE = "synthetic_info.json"
FORMAT_VERSION = 1
SHIFT = 4  # cv2 fractional bits: sub-pixel geometry keeps small sizes smooth
LOG = get_logger("synthetic_loco")

# Component class ids of the maps; the same for every image of a category.
CLASS_NAMES = {
    "synth_box": {0: "background", 1: "box", 2: "disc", 3: "square", 4: "dot"},
    "synth_bottle": {0: "background", 1: "glass", 2: "liquid", 3: "label", 4: "cap"},
}
# name, relative?, saturation (relative: fraction; absolute: a canonical area in units of the image area).
# Pattern of the real LOCO configs: missing/misplaced objects saturate at a fixed area, the rest at full overlap.
DISC_AREA = np.pi * 0.075 ** 2
DOT_AREA = np.pi * 0.035 ** 2
LABEL_AREA = 0.30 * 0.20
DEFECTS = {
    "synth_box": {
        "logical_anomalies": [("missing_component", False, DISC_AREA), ("extra_component", False, DISC_AREA),
                              ("wrong_colour", True, 1.0), ("misplaced_component", False, DISC_AREA),
                              ("wrong_count", False, DOT_AREA)],
        "structural_anomalies": [("scratch", True, 1.0), ("contamination", True, 1.0), ("broken_component", True, 0.5)],
    },
    "synth_bottle": {
        "logical_anomalies": [("mismatched_label", False, LABEL_AREA), ("missing_label", False, LABEL_AREA),
                              ("misplaced_label", False, LABEL_AREA), ("wrong_fill_level", True, 1.0),
                              ("extra_label", False, LABEL_AREA / 2)],
        "structural_anomalies": [("scratch", True, 1.0), ("contamination", True, 1.0), ("broken_bottle", True, 1.0)],
    },
}
SPLITS = (("train", "good"), ("validation", "good"), ("test", "good"), ("test", "logical_anomalies"),
          ("test", "structural_anomalies"))


def defects_config(category: str, size: int) -> list[dict]:
    """One entry per defect type, distinct pixel values counting down from 255; absolute thresholds in pixels."""
    entries, value = [], 255
    for kind in ("logical_anomalies", "structural_anomalies"):
        for name, relative, sat in DEFECTS[category][kind]:
            threshold = float(sat) if relative else max(1, int(round(sat * size * size)))
            entries.append({"defect_name": name, "pixel_value": value, "saturation_threshold": threshold,
                            "relative_saturation": relative})
            value -= 1
    return entries


# --------------------------------------------------------------------------------------------------- drawing
class Canvas:
    """Image (RGB uint8), class map and defect masks in the canonical frame; coordinates are in units of the side."""

    def __init__(self, size: int, background: tuple[int, int, int]):
        self.size = size
        self.img = np.empty((size, size, 3), np.uint8)
        self.img[:] = background
        self.cls = np.zeros((size, size), np.uint8)

    def p(self, x: float, y: float) -> tuple[int, int]:
        return int(round(x * self.size * (1 << SHIFT))), int(round(y * self.size * (1 << SHIFT)))

    def r(self, radius: float) -> int:
        return max(1 << SHIFT, int(round(radius * self.size * (1 << SHIFT))))

    def px(self, length: float) -> int:
        return max(1, int(round(length * self.size)))

    def shape_mask(self, shape: tuple, grow: float = 0.0) -> np.ndarray:
        """Boolean mask of ('circle', cx, cy, r) or ('poly', [(x, y), ...]), optionally grown by `grow`."""
        m = np.zeros((self.size, self.size), np.uint8)
        if shape[0] == "circle":
            _, cx, cy, rad = shape
            cv2.circle(m, self.p(cx, cy), self.r(rad + grow), 1, -1, cv2.LINE_8, SHIFT)
        else:
            cv2.fillPoly(m, [np.array([self.p(*q) for q in shape[1]], np.int32)], 1, cv2.LINE_8, SHIFT)
            if grow > 0:
                k = 2 * self.px(grow) + 1
                m = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        return m.astype(bool)

    def fill(self, shape: tuple, colour, cls: int | None) -> None:
        """Anti-aliased image fill; the class map gets the aliased footprint."""
        if shape[0] == "circle":
            _, cx, cy, rad = shape
            cv2.circle(self.img, self.p(cx, cy), self.r(rad), tuple(int(c) for c in colour), -1, cv2.LINE_AA, SHIFT)
        else:
            pts = np.array([self.p(*q) for q in shape[1]], np.int32)
            cv2.fillPoly(self.img, [pts], tuple(int(c) for c in colour), cv2.LINE_AA, SHIFT)
        if cls is not None:
            self.cls[self.shape_mask(shape)] = cls

    def paint(self, region: np.ndarray, colour, cls: int | None) -> None:
        self.img[region] = colour
        if cls is not None:
            self.cls[region] = cls


def rect(x0: float, y0: float, x1: float, y1: float) -> tuple:
    return ("poly", [(x0, y0), (x1, y0), (x1, y1), (x0, y1)])


def rotated_square(cx: float, cy: float, half: float, angle_deg: float) -> tuple:
    a = np.deg2rad(angle_deg)
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return ("poly", [(cx + u, cy + v) for u, v in corners @ rot.T])


def jitter_colour(rng: np.random.Generator, colour, amount: int = 6) -> np.ndarray:
    return np.clip(np.asarray(colour) + rng.integers(-amount, amount + 1, 3), 0, 255)


def random_blob(rng: np.random.Generator, cx: float, cy: float, radius: float, n: int = 12) -> tuple:
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = radius * rng.uniform(0.55, 1.0, n)
    return ("poly", list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles))))


@dataclass
class Defect:
    name: str
    mask: np.ndarray  # bool, canonical frame


# ------------------------------------------------------------------------------------------------- synth_box
BOX_OUTER = (0.10, 0.15, 0.90, 0.85)
BOX_INNER = (0.12, 0.17, 0.88, 0.83)
DISC_R, SQUARE_HALF, DOT_R = 0.075, 0.07, 0.035
BOX_KINDS = {"disc": (2, (200, 40, 40)), "square": (3, (40, 70, 200)), "dot": (4, (230, 205, 40))}
PALETTE = [(200, 40, 40), (40, 70, 200), (230, 205, 40), (50, 165, 60)]
FLOOR, WALL = (200, 182, 150), (130, 112, 92)
# Free places a defect may use: compartment -> slot positions.
FREE_SLOTS = {"left": [(0.30, 0.50)], "right_top": [(0.79, 0.325)],
              "right_bottom": [(0.62, 0.75), (0.70, 0.75), (0.78, 0.75)]}


@dataclass
class Component:
    kind: str
    x: float
    y: float
    compartment: str
    colour: tuple
    angle: float = 0.0
    broken: tuple | None = None  # wedge polygon cut out of the part

    def shape(self) -> tuple:
        if self.kind == "square":
            return rotated_square(self.x, self.y, SQUARE_HALF, self.angle)
        return ("circle", self.x, self.y, DISC_R if self.kind == "disc" else DOT_R)


@dataclass
class BoxScene:
    components: list[Component]
    used_slots: set = field(default_factory=set)
    touched: set = field(default_factory=set)  # component indices already changed by a defect
    regions: list = field(default_factory=list)  # (defect name, [shapes]) recorded for the masks


def box_scene(rng: np.random.Generator) -> BoxScene:
    j = lambda: rng.uniform(-0.01, 0.01)  # noqa: E731
    comps = [Component("disc", 0.30 + j(), 0.33 + j(), "left", BOX_KINDS["disc"][1]),
             Component("disc", 0.30 + j(), 0.67 + j(), "left", BOX_KINDS["disc"][1]),
             Component("square", 0.63 + j(), 0.325 + j(), "right_top", BOX_KINDS["square"][1], rng.uniform(-8, 8))]
    comps += [Component("dot", x + j() / 2, 0.61 + j() / 2, "right_bottom", BOX_KINDS["dot"][1]) for x in (0.62, 0.70, 0.78)]
    for c in comps:
        c.colour = tuple(jitter_colour(rng, c.colour))
    return BoxScene(comps)


def _free(scene: BoxScene, compartment: str) -> list[tuple[str, int]]:
    return [(compartment, i) for i in range(len(FREE_SLOTS[compartment])) if (compartment, i) not in scene.used_slots]


def _untouched(scene: BoxScene, kinds: tuple[str, ...]) -> list[int]:
    return [i for i, c in enumerate(scene.components) if c.kind in kinds and i not in scene.touched]


def box_missing(scene: BoxScene, rng) -> list | None:
    idx = _untouched(scene, ("disc", "square"))
    if not idx:
        return None
    i = int(rng.choice(idx))
    scene.touched.add(i)
    comp = scene.components[i]
    scene.components[i] = replace(comp, kind="removed")
    return [comp.shape()]


def box_extra(scene: BoxScene, rng) -> list | None:
    options = [("left", "disc"), ("right_top", "square")]
    options = [(c, k) for c, k in options if _free(scene, c)]
    if not options:
        return None
    comp_name, kind = options[int(rng.integers(len(options)))]
    slot = _free(scene, comp_name)[0]
    scene.used_slots.add(slot)
    x, y = FREE_SLOTS[comp_name][slot[1]]
    new = Component(kind, x + rng.uniform(-0.005, 0.005), y + rng.uniform(-0.005, 0.005), comp_name,
                    tuple(jitter_colour(rng, BOX_KINDS[kind][1])), rng.uniform(-8, 8))
    scene.components.append(new)
    scene.touched.add(len(scene.components) - 1)
    return [new.shape()]


def box_wrong_colour(scene: BoxScene, rng) -> list | None:
    idx = _untouched(scene, ("disc", "square", "dot"))
    if not idx:
        return None
    i = int(rng.choice(idx))
    comp = scene.components[i]
    choices = [c for c in PALETTE if c != BOX_KINDS[comp.kind][1]]
    comp.colour = tuple(jitter_colour(rng, choices[int(rng.integers(len(choices)))]))
    scene.touched.add(i)
    return [comp.shape()]


def box_misplaced(scene: BoxScene, rng) -> list | None:
    # disc -> right-top free slot, square -> left free slot, dot -> either
    targets = {"disc": ["right_top"], "square": ["left"], "dot": ["left", "right_top"]}
    options = [(i, t) for i in _untouched(scene, ("disc", "square", "dot"))
               for t in targets[scene.components[i].kind] if _free(scene, t)]
    if not options:
        return None
    i, target = options[int(rng.integers(len(options)))]
    comp = scene.components[i]
    slot = _free(scene, target)[0]
    scene.used_slots.add(slot)
    old = comp.shape()
    comp.x, comp.y = FREE_SLOTS[target][slot[1]]
    comp.compartment = target
    scene.touched.add(i)
    return [old, comp.shape()]


def box_wrong_count(scene: BoxScene, rng) -> list | None:
    dots = [i for i, c in enumerate(scene.components) if c.kind == "dot"]
    free_row = _free(scene, "right_bottom")
    if any(i in scene.touched for i in dots) or len(free_row) < 2:
        return None
    delta = int(rng.choice([-2, -1, 1, 2]))
    shapes = []
    if delta < 0:
        for i in rng.choice(dots, -delta, replace=False):
            shapes.append(scene.components[i].shape())
            scene.components[i] = replace(scene.components[i], kind="removed")
    else:
        for slot in free_row[:delta]:
            scene.used_slots.add(slot)
            x, y = FREE_SLOTS["right_bottom"][slot[1]]
            scene.components.append(Component("dot", x, y, "right_bottom", tuple(jitter_colour(rng, BOX_KINDS["dot"][1]))))
            shapes.append(scene.components[-1].shape())
    scene.touched.update(dots + list(range(len(scene.components) - max(delta, 0), len(scene.components))))
    return shapes


def box_broken(scene: BoxScene, rng) -> list | None:
    idx = _untouched(scene, ("disc", "square"))
    if not idx:
        return None
    i = int(rng.choice(idx))
    comp = scene.components[i]
    a = rng.uniform(0, 2 * np.pi)
    half = rng.uniform(0.35, 0.6)
    reach = 0.2  # beyond the part's edge; the wedge is clipped to the part footprint
    comp.broken = ("poly", [(comp.x + 0.01 * np.cos(a), comp.y + 0.01 * np.sin(a)),
                            (comp.x + reach * np.cos(a - half), comp.y + reach * np.sin(a - half)),
                            (comp.x + reach * np.cos(a + half), comp.y + reach * np.sin(a + half))])
    scene.touched.add(i)
    return None  # mask computed at render time (wedge within the part)


BOX_LOGICAL: dict[str, Callable] = {"missing_component": box_missing, "extra_component": box_extra,
                                    "wrong_colour": box_wrong_colour, "misplaced_component": box_misplaced,
                                    "wrong_count": box_wrong_count}


def render_box(rng: np.random.Generator, size: int, logical: list[str], structural: list[str]) -> tuple:
    scene = box_scene(rng)
    shapes_by_defect: list[tuple[str, list]] = []
    for name in logical:
        shapes = BOX_LOGICAL[name](scene, rng)
        if shapes is None:
            raise RuntimeError(f"box defect {name} not applicable")  # callers only combine compatible defects
        shapes_by_defect.append((name, shapes))
    if "broken_component" in structural:
        box_broken(scene, rng)

    cv = Canvas(size, jitter_colour(rng, (70, 70, 76), 4))
    cv.fill(rect(*BOX_OUTER), jitter_colour(rng, WALL, 5), 1)
    floor = jitter_colour(rng, FLOOR, 5)
    for r in [(0.12, 0.17, 0.49, 0.83), (0.51, 0.17, 0.88, 0.49), (0.51, 0.51, 0.88, 0.83)]:
        cv.fill(rect(*r), floor, 1)
    defects = [Defect(name, np.logical_or.reduce([cv.shape_mask(s, 0.008) for s in shapes]))
               for name, shapes in shapes_by_defect]
    for comp in scene.components:
        if comp.kind == "removed":
            continue
        cv.fill(comp.shape(), comp.colour, BOX_KINDS[comp.kind][0])
        if comp.broken is not None:
            cut = cv.shape_mask(comp.broken) & cv.shape_mask(comp.shape())
            cv.paint(cut, floor, 1)
            defects.append(Defect("broken_component", cut))
    defects += structural_defects(cv, rng, [s for s in structural if s != "broken_component"], BOX_INNER)
    return cv, defects


# ---------------------------------------------------------------------------------------------- synth_bottle
SILHOUETTE = ("poly", [(0.44, 0.12), (0.56, 0.12), (0.56, 0.22), (0.65, 0.33), (0.65, 0.92), (0.35, 0.92),
                       (0.35, 0.33), (0.44, 0.22)])
BODY = (0.36, 0.36, 0.64, 0.90)  # where scratches and blobs go
FILLS = [(235, 135, 30), (125, 45, 140), (95, 175, 55)]  # allowed pairs: FILLS[i] with LABELS[i]
LABELS = [(250, 200, 110), (190, 120, 215), (165, 225, 120)]
GLASS, OUTLINE, CAP = (215, 228, 235), (55, 60, 70), (60, 60, 64)
FILL_LEVEL, LABEL_Y = 0.45, (0.58, 0.78)


@dataclass
class BottleScene:
    pair: int
    label_colour: int
    label_y: tuple | None
    fill_level: float
    extra_label_y: tuple | None = None
    notch: tuple | None = None


def bottle_logical(scene: BottleScene, name: str, rng) -> list:
    """Change the scene; return the shapes whose union is the defect's mask."""
    body = lambda y0, y1: rect(0.35, y0, 0.65, y1)  # noqa: E731
    if name == "mismatched_label":
        scene.label_colour = int(rng.choice([i for i in range(len(FILLS)) if i != scene.pair]))
        return [body(*scene.label_y)]
    if name == "missing_label":
        shapes, scene.label_y = [body(*scene.label_y)], None
        return shapes
    if name == "misplaced_label":
        old = scene.label_y
        top = rng.uniform(0.35, 0.37)
        scene.label_y = (top, top + old[1] - old[0])
        return [body(*old), body(*scene.label_y)]
    if name == "wrong_fill_level":
        new = rng.uniform(0.27, 0.31) if rng.random() < 0.5 else rng.uniform(0.81, 0.86)
        lo, hi = sorted((scene.fill_level, new))
        scene.fill_level = new
        return [("band", lo, hi)]
    if name == "extra_label":
        top = rng.uniform(0.385, 0.42)
        scene.extra_label_y = (top, top + 0.10)
        return [body(*scene.extra_label_y)]
    raise KeyError(name)


def render_bottle(rng: np.random.Generator, size: int, logical: list[str], structural: list[str]) -> tuple:
    pair = int(rng.integers(len(FILLS)))
    dy = rng.uniform(-0.005, 0.005)
    scene = BottleScene(pair, pair, (LABEL_Y[0] + dy, LABEL_Y[1] + dy), FILL_LEVEL + rng.uniform(-0.01, 0.01))
    shapes_by_defect = [(name, bottle_logical(scene, name, rng)) for name in logical]

    cv = Canvas(size, jitter_colour(rng, (95, 105, 118), 4))
    sil = cv.shape_mask(SILHOUETTE)
    rows = (np.arange(size)[:, None] + 0.5) / size
    cv.fill(SILHOUETTE, jitter_colour(rng, GLASS, 6), 1)
    cv.paint(sil & (rows >= scene.fill_level), jitter_colour(rng, FILLS[scene.pair], 5), 2)
    label_colour = jitter_colour(rng, LABELS[scene.label_colour], 5)
    for ly in (scene.label_y, scene.extra_label_y):
        if ly is not None:
            cv.fill(rect(0.35, ly[0], 0.65, ly[1]), label_colour, 3)
            mid = (ly[0] + ly[1]) / 2  # a white text band makes it look like a label
            cv.fill(rect(0.40, mid - 0.012, 0.60, mid + 0.012), (245, 245, 245), 3)
    cv.fill(rect(0.43, 0.06, 0.57, 0.125), jitter_colour(rng, CAP, 6), 4)
    pts = np.array([cv.p(*q) for q in SILHOUETTE[1]], np.int32)
    cv2.polylines(cv.img, [pts], True, tuple(int(c) for c in OUTLINE), cv.px(0.006), cv2.LINE_AA, SHIFT)

    labels = cv.cls == 3  # a fill-level change is only visible outside the labels
    defects = []
    for name, shapes in shapes_by_defect:
        parts = [(sil & ~labels & (rows >= s[1]) & (rows < s[2])) if s[0] == "band" else cv.shape_mask(s, 0.006)
                 for s in shapes]
        defects.append(Defect(name, np.logical_or.reduce(parts)))
    if "broken_bottle" in structural:
        y = rng.uniform(0.45, 0.85)
        side, inward = (0.35, 1) if rng.random() < 0.5 else (0.65, -1)
        depth, half = rng.uniform(0.05, 0.08), rng.uniform(0.03, 0.05)
        notch = ("poly", [(side - inward * 0.02, y - half), (side + inward * depth, y + rng.uniform(-0.01, 0.01)),
                          (side - inward * 0.02, y + half)])
        cut = cv.shape_mask(notch) & cv.shape_mask(SILHOUETTE, 0.004)
        cv.paint(cut, cv.img[0, 0], 0)
        defects.append(Defect("broken_bottle", cut))
    defects += structural_defects(cv, rng, [s for s in structural if s != "broken_bottle"], BODY)
    return cv, defects


# ------------------------------------------------------------------------------------------ shared defects
def structural_defects(cv: Canvas, rng: np.random.Generator, names: list[str], area: tuple) -> list[Defect]:
    """Scratch (light polyline) and contamination (dark irregular blob) inside `area` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = area
    out = []
    for name in names:
        if name == "scratch":
            n = int(rng.integers(3, 5))
            start = np.array([rng.uniform(x0 + 0.05, x1 - 0.05), rng.uniform(y0 + 0.05, y1 - 0.05)])
            steps = rng.normal(0, 1, (n - 1, 2))
            steps = steps / np.linalg.norm(steps, axis=1, keepdims=True) * rng.uniform(0.05, 0.1, (n - 1, 1))
            pts = np.clip(start + np.cumsum(np.vstack([[0, 0], steps]), axis=0), [x0, y0], [x1, y1])
            poly = np.array([cv.p(*q) for q in pts], np.int32)
            width = cv.px(0.012)
            cv2.polylines(cv.img, [poly], False, tuple(int(c) for c in jitter_colour(rng, (238, 238, 230), 6)),
                          width, cv2.LINE_AA, SHIFT)
            m = np.zeros((cv.size, cv.size), np.uint8)
            cv2.polylines(m, [poly], False, 1, width + 2, cv2.LINE_8, SHIFT)
            out.append(Defect(name, m.astype(bool)))
        elif name == "contamination":
            blob = random_blob(rng, rng.uniform(x0 + 0.06, x1 - 0.06), rng.uniform(y0 + 0.06, y1 - 0.06),
                               rng.uniform(0.035, 0.06))
            cv.fill(blob, jitter_colour(rng, (75, 90, 35), 12), None)
            out.append(Defect(name, cv.shape_mask(blob, 0.004)))
        else:
            raise KeyError(name)
    return out


RENDERERS = {"synth_box": render_box, "synth_bottle": render_bottle}
# Logical defects that can share one image (the second defect of a two-defect image).
COMPATIBLE = {
    "synth_box": {"missing_component": "wrong_colour", "extra_component": "wrong_count", "wrong_colour": "missing_component",
                  "misplaced_component": "wrong_colour", "wrong_count": "missing_component"},
    "synth_bottle": {"mismatched_label": "wrong_fill_level", "missing_label": "wrong_fill_level",
                     "misplaced_label": "wrong_fill_level", "wrong_fill_level": "mismatched_label",
                     "extra_label": "wrong_fill_level"},
}


def defects_for(category: str, kind: str, index: int) -> list[str]:
    """Defect types of test image `index`: types cycle so every type occurs; every 4th image gets a second defect."""
    if kind == "good":
        return []
    names = [d[0] for d in DEFECTS[category][kind]]
    first = names[index % len(names)]
    if index % 4 != 3:
        return [first]
    second = COMPATIBLE[category][first] if kind == "logical_anomalies" else names[(index + 1) % len(names)]
    return [first, second]


def apply_pose_and_light(rng: np.random.Generator, cv: Canvas, masks: list[np.ndarray]) -> tuple:
    """Small shift/rotation (same warp for image, class map and masks), then lighting, colour cast and noise."""
    s = cv.size
    angle = rng.uniform(-4, 4)
    M = cv2.getRotationMatrix2D((s / 2, s / 2), angle, 1.0)
    M[:, 2] += rng.uniform(-0.03, 0.03, 2) * s
    img = cv2.warpAffine(cv.img, M, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    cls = cv2.warpAffine(cv.cls, M, (s, s), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    warped = [cv2.warpAffine(m.astype(np.uint8), M, (s, s), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                             borderValue=0).astype(bool) for m in masks]
    coords = (np.arange(s, dtype=np.float32) + 0.5) / s - 0.5
    phi = rng.uniform(0, 2 * np.pi)
    gradient = coords[None, :] * np.cos(phi) + coords[:, None] * np.sin(phi)
    gain = rng.uniform(0.9, 1.1) * (1 + rng.uniform(0, 0.1) * gradient)
    tint = rng.uniform(0.98, 1.02, 3).astype(np.float32)
    out = img.astype(np.float32) * gain[..., None] * tint + rng.normal(0, 2.5, img.shape).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), cls, warped


def make_image(category: str, kind: str, index: int, size: int, rng: np.random.Generator) -> tuple:
    """(RGB image, class map, [(defect name, mask)]); every mask is non-empty."""
    names = defects_for(category, kind, index)
    logical = names if kind == "logical_anomalies" else []
    structural = names if kind == "structural_anomalies" else []
    for _ in range(10):  # a defect may fall outside the frame after the pose; draw again
        cv, defects = RENDERERS[category](rng, size, logical, structural)
        img, cls, masks = apply_pose_and_light(rng, cv, [d.mask for d in defects])
        if all(m.any() for m in masks):
            return img, cls, [(d.name, m) for d, m in zip(defects, masks)]
    raise RuntimeError(f"{category} {kind} {index}: a defect mask stayed empty at size {size}; use a larger --size")


# ------------------------------------------------------------------------------------------------ writing
def _write_png(path: Path, array: np.ndarray) -> None:
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), array, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise OSError(f"cannot write {path}")


def _params(size, *, n_train, n_val, n_test, seed, component_maps) -> dict:
    return {"format_version": FORMAT_VERSION, "size": size, "n_train": n_train, "n_val": n_val, "n_test": n_test,
            "seed": seed, "component_maps": component_maps}


def _is_complete(cat_dir: Path) -> dict | None:
    """The generation parameters if `cat_dir` is a finished synthetic category (all files counted), else None."""
    try:
        info = json.loads((cat_dir / INFO_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    counts = {"train/good": info["n_train"], "validation/good": info["n_val"]}
    counts.update({f"test/{k}": info["n_test"] for k in ("good", "logical_anomalies", "structural_anomalies")})
    for folder, n in counts.items():
        d = cat_dir / folder
        if not d.is_dir() or len([p for p in d.iterdir() if p.suffix == ".png"]) != n:
            return None
    return info if (cat_dir / "defects_config.json").is_file() else None


def generate_category(root: Path, category: str, *, size: int, n_train: int, n_val: int, n_test: int, seed: int,
                      component_maps: bool) -> Path:
    """Write one category into a temporary folder, then rename it into place (never a half-written category)."""
    cat_index = SYNTHETIC_CATEGORIES.index(category)
    tmp = root / f".{category}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    counts = {"train": n_train, "validation": n_val, "test": n_test}
    jobs = [(split, kind, i) for split, kind in SPLITS for i in range(counts[split])]
    config = defects_config(category, size)
    value_of = {e["defect_name"]: e["pixel_value"] for e in config}
    try:
        for split_index, (split, kind) in enumerate(SPLITS):
            (tmp / split / kind).mkdir(parents=True, exist_ok=True)
            if kind != "good":
                (tmp / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            if component_maps:
                (tmp / "component_maps" / split / kind).mkdir(parents=True, exist_ok=True)
        for split, kind, i in tqdm(jobs, desc=category, unit="img", leave=False, disable=None):
            # One seed per image: changing a count never changes the other images.
            rng = np.random.default_rng([seed, cat_index, SPLITS.index((split, kind)), i])
            img, cls, masks = make_image(category, kind, i, size, rng)
            stem = f"{i:03d}"
            _write_png(tmp / split / kind / f"{stem}.png", img)
            if component_maps:
                _write_png(tmp / "component_maps" / split / kind / f"{stem}.png", cls)
            if masks:
                gt = tmp / "ground_truth" / kind / stem
                gt.mkdir()
                for k, (name, m) in enumerate(masks):
                    _write_png(gt / f"{k:03d}.png", m.astype(np.uint8) * np.uint8(value_of[name]))
        (tmp / "defects_config.json").write_text(json.dumps(config, indent=4))
        info = _params(size, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, component_maps=component_maps)
        info["class_names"] = CLASS_NAMES[category]
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
        target = root / category
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same category first
            if _is_complete(target) is None:
                raise
            LOG.info("%s was written concurrently by another process; keeping that copy", target)
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def add_component_maps(root: Path, category: str, info: dict) -> None:
    """Add the maps to a complete category written without them: re-render it from its stored parameters, check
    that the images come out byte-identical, then move only the component_maps folder in."""
    cat_dir = root / category
    scratch = root / f".{category}.maps-{os.getpid()}"
    try:
        generate_category(scratch, category, size=info["size"], n_train=info["n_train"], n_val=info["n_val"],
                          n_test=info["n_test"], seed=info["seed"], component_maps=True)
        new = scratch / category
        for split in ("train", "validation", "test"):
            for p in sorted((new / split).rglob("*.png")):
                old = cat_dir / p.relative_to(new)
                if not old.is_file() or old.read_bytes() != p.read_bytes():
                    raise DatasetError(f"{cat_dir} was written by another generator version ({old} differs) and has "
                                       "no component maps; delete it or pass --force --component-maps")
        os.rename(new / "component_maps", cat_dir / "component_maps")
        info = dict(info, component_maps=True)
        tmp_info = cat_dir / f".{INFO_FILE}.{os.getpid()}"
        tmp_info.write_text(json.dumps(info, indent=1))
        os.replace(tmp_info, cat_dir / INFO_FILE)
        LOG.info("added component maps to %s", cat_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def generate(root: str | os.PathLike = DEFAULT_ROOT, *, size: int = 256, n_train: int = 60, n_val: int = 20,
             n_test: int = 20, seed: int = 0, categories: list[str] | tuple[str, ...] | None = None,
             component_maps: bool = False, force: bool = False) -> Path:
    """Write the synthetic dataset; existing complete categories are kept (pass force=True to rewrite them)."""
    root = Path(root)
    categories = list(categories or SYNTHETIC_CATEGORIES)
    for c in categories:
        if c not in SYNTHETIC_CATEGORIES:
            raise DatasetError(f"unknown synthetic category '{c}'; choose from: {', '.join(SYNTHETIC_CATEGORIES)}")
    if size < 32 or min(n_train, n_val, n_test) < 1:
        raise ValueError(f"size must be >= 32 and every count >= 1 (got size={size}, counts={n_train}/{n_val}/{n_test})")
    root.mkdir(parents=True, exist_ok=True)
    wanted = _params(size, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, component_maps=component_maps)
    for category in categories:
        cat_dir = root / category
        if cat_dir.exists() and not force:
            info = _is_complete(cat_dir)
            if info is None:
                raise DatasetError(f"{cat_dir} exists but is incomplete; delete it or pass --force to regenerate")
            if component_maps and not info.get("component_maps"):
                add_component_maps(root, category, info)
            have = {k: info.get(k) for k in wanted}
            differs = {k: v for k, v in have.items() if v != wanted[k] and k != "component_maps"}
            LOG.info("%s exists and is complete, skipping%s", cat_dir,
                     f" (it has {differs}; pass --force to regenerate)" if differs else "")
            continue
        if cat_dir.exists():
            LOG.info("--force: removing %s", cat_dir)
            shutil.rmtree(cat_dir)
        t0 = time.perf_counter()
        generate_category(root, category, size=size, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed,
                          component_maps=component_maps)
        LOG.info("wrote %s (%d images at %dx%d) in %.1f s", cat_dir, n_train + n_val + 3 * n_test, size, size,
                 time.perf_counter() - t0)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the built-in synthetic MVTec LOCO-style dataset.",
                                     allow_abbrev=False)  # '--n 5' must not silently mean --n-train
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="output folder (default: datasets/synthetic_loco)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--n-train", type=int, default=60)
    parser.add_argument("--n-val", type=int, default=20)
    parser.add_argument("--n-test", type=int, default=20, help="images per test type (good, logical, structural)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--categories", nargs="+", default=list(SYNTHETIC_CATEGORIES), choices=SYNTHETIC_CATEGORIES)
    parser.add_argument("--component-maps", action="store_true", help="also write the true component class maps")
    parser.add_argument("--force", action="store_true", help="regenerate categories that already exist")
    args = parser.parse_args(argv)
    from common.cli import ensure_writable_dir
    from common.errors import UserError

    try:
        ensure_writable_dir(args.root, "--root")
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    t0 = time.perf_counter()
    try:
        root = generate(args.root, size=args.size, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                        seed=args.seed, categories=args.categories, component_maps=args.component_maps,
                        force=args.force)
    except (DatasetError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"synthetic LOCO dataset in {root.resolve()} ({', '.join(args.categories)}), "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
