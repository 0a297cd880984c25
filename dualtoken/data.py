"""Data: the procedural "toy world" image-caption set the embedded default model is trained on, and real-scale loaders.

Toy world. Each image holds one object on a background. The object is a Fashion-MNIST silhouette or a drawn shape,
filled with one of eight named colours and one of four textures; the background is a muted plain tone or a dimmed
crop of a scikit-image photo. Every image therefore has an exact caption ("a red striped sneaker") and exact
answers to questions about category, colour, texture and position: enough structure for the semantic tokens to
learn concepts and for the pixel tokens to learn reconstruction, on a CPU, offline.

Splits never share a silhouette: train draws Fashion-MNIST train items, val and test the even and odd items of the
Fashion-MNIST test split, and every random choice comes from a generator seeded by (seed, split, index). The four
photos ``astronaut``, ``coffee``, ``chelsea`` and ``rocket`` are held out as natural-image evaluation images
(``natural_eval_images``) and never appear as backgrounds.

Real scale. ``ImageFolderDataset`` and ``webdataset_images`` read user data for the trainer; unreadable files,
samples and shards are skipped and counted rather than crashing a long run.
"""

from __future__ import annotations

import colorsys
import functools
import glob
import gzip
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset, IterableDataset

from dualtoken.errors import DataError, ImageInputError, MissingDataError
from dualtoken.imageio import MAX_PIXELS, load_image, to_rgb

logger = logging.getLogger(__name__)

# --- vocabulary ---------------------------------------------------------------------------------------------------

FASHION_CATEGORIES = (  # Fashion-MNIST label order
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
SHAPE_CATEGORIES = ("circle", "square", "triangle", "star", "heart", "cross")
CATEGORIES = FASHION_CATEGORIES + SHAPE_CATEGORIES
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
TEXTURES = ("plain", "striped", "dotted", "checkered")
POSITIONS = ("center", "left", "right", "top", "bottom")
ATTRIBUTES = {"category": CATEGORIES, "color": COLORS, "texture": TEXTURES, "position": POSITIONS}

QUESTION_TEMPLATES = {
    "category": ("what is the object?", "what kind of object is shown?", "what object is in the image?"),
    "color": ("what color is the object?", "what is the color of the object?", "which color does the object have?"),
    "texture": (
        "what pattern does the object have?",
        "what is the texture of the object?",
        "is the object plain, striped, dotted or checkered?",
    ),
    "position": (
        "where is the object?",
        "where in the image is the object?",
        "in which part of the image is the object?",
    ),
}

# Held out as natural-image evaluation images: never a toy-world background. (skimage's `cat` is chelsea again.)
NATURAL_EVAL_IMAGES = ("astronaut", "coffee", "chelsea", "rocket")
BACKGROUND_PHOTOS = (
    "hubble_deep_field", "retina", "immunohistochemistry", "stereo_motorcycle",
    "camera", "brick", "grass", "gravel", "moon", "page", "text", "coins", "clock", "cell",
)

SPLITS = {"train": 0, "val": 1, "test": 2, "fmnist-train": 3, "fmnist-test": 4}  # seed-sequence ids

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "DUALTOKEN_FASHION_MNIST_DIR"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# --- captions and questions ---------------------------------------------------------------------------------------


def _a(word: str) -> str:
    # Always "a", even before a vowel: the caption format is fixed word for word ("a {color} {texture} {category}")
    # so prompts typed in the app and in evaluation match the training captions exactly.
    return "a " + word


def canonical_caption(color: str, texture: str, category: str) -> str:
    """The caption every toy image is trained with: "a red striped sneaker", "a orange plain bag"."""
    return f"{_a(color)} {texture} {category}"


def caption_variants(sample) -> list[str]:
    """All captions true of ``sample`` (anything with .color, .texture, .category): canonical first, then
    paraphrases, then partial captions naming a single attribute."""
    color, texture, category = sample.color, sample.texture, sample.category
    pattern = "no pattern" if texture == "plain" else f"a {texture} pattern"
    return [
        canonical_caption(color, texture, category),
        f"a photo of {canonical_caption(color, texture, category)}",
        f"{_a(category)} that is {color} and {texture}",
        f"{_a(color)} {category} with {pattern}",
        _a(category),
        f"{_a(color)} object",
        f"{_a(texture)} object",
    ]


def qa_pairs(sample) -> list[tuple[str, str]]:
    """Every (question, one-word answer) pair of ``QUESTION_TEMPLATES`` for ``sample``."""
    return [(q, getattr(sample, attr)) for attr, questions in QUESTION_TEMPLATES.items() for q in questions]


def label_index(attr: str, word: str) -> int:
    """Index of ``word`` in the vocabulary of ``attr`` ("category", "color", "texture" or "position")."""
    try:
        return ATTRIBUTES[attr].index(word)
    except KeyError:
        raise ValueError(f"unknown attribute {attr!r}; expected one of {sorted(ATTRIBUTES)}") from None
    except ValueError:
        raise ValueError(f"{word!r} is not a {attr}; expected one of {ATTRIBUTES[attr]}") from None


def holdout_combinations(seed: int = 0, fraction: float = 0.05, categories: Sequence[str] = CATEGORIES) -> frozenset:
    """A fixed set of (color, texture, category) triples to keep out of training, for compositional
    text-to-image evaluation. Deterministic in (seed, fraction, categories)."""
    triples = [(c, t, k) for k in categories for c in COLORS for t in TEXTURES]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919]))
    chosen = rng.permutation(len(triples))[: round(fraction * len(triples))]
    return frozenset(triples[i] for i in chosen)


# --- Fashion-MNIST ------------------------------------------------------------------------------------------------


def fashion_mnist_dir(directory: str | os.PathLike | None = None) -> Path:
    """Where Fashion-MNIST is read from: ``directory``, else $DUALTOKEN_FASHION_MNIST_DIR, else the Debian path."""
    return Path(directory or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def _idx_file(directory: Path, stem: str) -> Path | None:
    return next((p for p in (directory / f"{stem}.gz", directory / stem) if p.is_file()), None)


def fashion_mnist_available(directory: str | os.PathLike | None = None) -> bool:
    root = fashion_mnist_dir(directory)
    return all(_idx_file(root, stem) for files in _FASHION_FILES.values() for stem in files)


def _read_idx(path: Path) -> np.ndarray:
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * d : 8 + 4 * d], "big") for d in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise DataError(f"{path}: truncated idx file ({data.size} values for shape {shape})")
    return data.reshape(shape)


@functools.lru_cache(maxsize=4)
def _load_fashion_cached(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_stem, labels_stem = _FASHION_FILES[split]
    paths = [_idx_file(root, images_stem), _idx_file(root, labels_stem)]
    if None in paths:
        raise MissingDataError(
            f"Fashion-MNIST not found in {root} (need {images_stem}.gz and {labels_stem}.gz). Install it with "
            f"`apt-get install dataset-fashion-mnist`, point ${FASHION_MNIST_ENV} at a folder holding the idx files, "
            "or use the shapes alone, which need no data set (categories=SHAPE_CATEGORIES; the trainers' --data "
            "toy-shapes)."
        )
    images, labels = (_read_idx(p) for p in paths)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(f"{root}: Fashion-MNIST {split} files have unexpected shapes {images.shape}, {labels.shape}")
    return images, labels


def load_fashion_mnist(
    split: str = "train", directory: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ("train" or "test") as (images (N, 28, 28) uint8, labels (N,) uint8); cached."""
    if split not in _FASHION_FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    return _load_fashion_cached(fashion_mnist_dir(directory).resolve(), split)


# --- rendering ----------------------------------------------------------------------------------------------------

# Each colour is a family (hue centre and spread in degrees, saturation range, value range), so "red" is a range of
# reds, all unmistakably red. `pattern_value` scales the value for the texture's contrasting shade of the same hue.
_COLOR_FAMILIES = {
    "red": dict(hue=(0, 6), sat=(0.8, 1.0), val=(0.75, 0.95), pattern_value=0.5),
    "orange": dict(hue=(27, 4), sat=(0.85, 1.0), val=(0.93, 1.0), pattern_value=0.68),
    "yellow": dict(hue=(54, 4), sat=(0.8, 1.0), val=(0.92, 1.0), pattern_value=0.72),
    "green": dict(hue=(125, 14), sat=(0.65, 0.95), val=(0.55, 0.8), pattern_value=0.5),
    "blue": dict(hue=(218, 9), sat=(0.75, 1.0), val=(0.75, 0.95), pattern_value=0.5),
    "purple": dict(hue=(282, 9), sat=(0.55, 0.8), val=(0.55, 0.75), pattern_value=0.5),
    "white": dict(hue=(0, 180), sat=(0.0, 0.04), val=(0.94, 1.0), pattern_value=0.65),
    "black": dict(hue=(0, 180), sat=(0.0, 0.08), val=(0.05, 0.12), pattern_value=None),  # pattern: gray, below
}
_BLACK_PATTERN_VALUE = (0.36, 0.44)
_ACHROMATIC = ("white", "black")


def _luma(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _draw_colors(rng: np.random.Generator, color: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(fill RGB, pattern RGB, hue in [0, 1)) for one object; RGB as float32 in [0, 1]."""
    family = _COLOR_FAMILIES[color]
    hue = ((family["hue"][0] + rng.uniform(-1, 1) * family["hue"][1]) / 360.0) % 1.0
    sat, val = rng.uniform(*family["sat"]), rng.uniform(*family["val"])
    fill = colorsys.hsv_to_rgb(hue, sat, val)
    if family["pattern_value"] is None:
        pattern = colorsys.hsv_to_rgb(hue, sat, rng.uniform(*_BLACK_PATTERN_VALUE))
    else:
        pattern = colorsys.hsv_to_rgb(hue, sat, val * family["pattern_value"])
    return np.array(fill, np.float32), np.array(pattern, np.float32), hue


def _contrasts(tone_luma: float, tone_hue: float, tone_sat: float, color: str, fill: np.ndarray, hue: float) -> bool:
    """Whether a background tone keeps the object visible and unmistakable: clearly lighter or darker (more so for
    white and black, which have no hue to stand out by), and not a tint of the object's own hue."""
    if abs(tone_luma - _luma(fill)) < (0.35 if color in _ACHROMATIC else 0.2):
        return False
    hue_gap = min(abs(tone_hue - hue), 1 - abs(tone_hue - hue))
    return color in _ACHROMATIC or tone_sat < 0.1 or hue_gap > 40 / 360


def _draw_tone(rng, color, fill, hue, sat_max) -> np.ndarray:
    """A muted background tone (RGB) contrasting with the object. Rejection sampling: every colour family leaves
    a wide band of valid tones, so this takes a few tries."""
    while True:
        tone_hue, tone_sat, tone_val = rng.uniform(0, 1), rng.uniform(0, sat_max), rng.uniform(0.12, 0.95)
        rgb = colorsys.hsv_to_rgb(tone_hue, tone_sat, tone_val)
        if _contrasts(_luma(rgb), tone_hue, tone_sat, color, fill, hue):
            return np.array(rgb, np.float32)


@functools.lru_cache(maxsize=1)
def _background_photos() -> dict[str, Image.Image]:
    import skimage.data

    photos = {}
    for name in BACKGROUND_PHOTOS:
        array = getattr(skimage.data, name)()
        if name == "stereo_motorcycle":
            array = array[0]  # (left view, right view, disparity): one view
        photo = to_rgb(Image.fromarray(array))
        photo.thumbnail((512, 512), Image.Resampling.BILINEAR)
        photos[name] = photo
    return photos


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    return xs, ys


def _background(rng, r, color, fill, hue, photo_probability) -> tuple[np.ndarray, str]:
    """(r, r, 3) float32 background and its name ("plain" or "photo:<name>")."""
    xs, ys = _pixel_grid(r)
    if rng.random() >= photo_probability:
        tone = _draw_tone(rng, color, fill, hue, sat_max=0.3)
        angle, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.12)  # a gentle light gradient
        ramp = 1 + strength * ((xs * np.cos(angle) + ys * np.sin(angle)) / r - 0.5)
        return np.clip(tone * ramp[..., None], 0, 1), "plain"

    name = BACKGROUND_PHOTOS[rng.integers(len(BACKGROUND_PHOTOS))]
    photo = _background_photos()[name]
    side = rng.uniform(0.35, 1.0) * min(photo.size)
    x0, y0 = rng.uniform(0, photo.width - side), rng.uniform(0, photo.height - side)
    # Read the crop at up to half resolution and scale it up: a soft focus that keeps photo detail from competing
    # with the object's texture (and costs less than a Gaussian blur).
    low = max(8, round(r / rng.uniform(1.0, 2.0)))
    crop = photo.resize((low, low), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    crop = crop.resize((r, r), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crop = np.asarray(crop, np.float32) / 255
    # Dim the photo to a low-contrast band around a tone that contrasts with the object, and mute its colours,
    # so the object stays the most salient thing and its colour name stays unambiguous.
    luma = crop @ np.array([0.299, 0.587, 0.114], np.float32)
    chroma = crop - luma[..., None]
    z = np.clip((luma - luma.mean()) / (luma.std() + 1e-3), -2.5, 2.5)
    tone = _draw_tone(rng, color, fill, hue, sat_max=0.15)
    amplitude, saturation = rng.uniform(0.04, 0.1), rng.uniform(0.2, 0.5)
    out = tone + (amplitude * z)[..., None] + saturation * chroma
    return np.clip(out, 0, 1), f"photo:{name}"


def _placement(rng, position) -> tuple[float, float, float]:
    """(size, cx, cy) in frame fractions: size is the object's longer side, 35-80% of the frame."""
    if position == "center":
        size = rng.uniform(0.45, 0.8)
        cx, cy = 0.5 + rng.uniform(-0.05, 0.05, 2)
        return size, cx, cy
    size = rng.uniform(0.35, 0.6)
    along = rng.uniform(size / 2 - 0.04, 0.36)  # at most 4% of the frame outside the border
    across = 0.5 + rng.uniform(-0.08, 0.08)
    cx, cy = {
        "left": (along, across), "right": (1 - along, across), "top": (across, along), "bottom": (across, 1 - along)
    }[position]
    return size, cx, cy


def _shape_outline(rng, shape) -> np.ndarray:
    """(N, 2) polygon of a shape in unit coordinates (y down), with its own small rotation and aspect jitter."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        pts, aspect, tilt = np.stack([np.cos(t), np.sin(t)], 1), rng.uniform(0.93, 1.0), rng.uniform(0, 180)
    elif shape == "square":
        pts = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], float)
        aspect, tilt = rng.uniform(0.9, 1.1), rng.uniform(-20, 20)
    elif shape == "triangle":
        half_base = rng.uniform(0.95, 1.15)
        pts = np.array([(0, -1), (half_base, 0.75), (-half_base, 0.75)], float)
        aspect, tilt = 1.0, rng.uniform(-15, 15)
    elif shape == "star":
        radius = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.4, 0.5))
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        pts, aspect, tilt = np.stack([radius * np.cos(t), radius * np.sin(t)], 1), 1.0, rng.uniform(-15, 15)
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts, aspect, tilt = np.stack([x, y], 1) / 16, rng.uniform(0.9, 1.1), rng.uniform(-12, 12)
    elif shape == "cross":
        a = rng.uniform(0.28, 0.38)  # half thickness of the arms
        pts = np.array([
            (-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a),
            (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a),
        ])
        aspect, tilt = rng.uniform(0.9, 1.1), rng.uniform(-15, 15)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    theta = np.deg2rad(tilt)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return (pts * [aspect, 1.0]) @ rotation.T


def _shape_mask(rng, shape, r, size, cx, cy) -> np.ndarray:
    pts = _shape_outline(rng, shape)
    lo, hi = pts.min(0), pts.max(0)
    ss = 4  # drawn at 4x and box-reduced: 16 coverage samples per pixel on the edges
    pts = (pts - (lo + hi) / 2) * (ss * size * r / (hi - lo).max()) + [ss * cx * r, ss * cy * r]
    canvas = Image.new("L", (ss * r, ss * r), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts], fill=255)
    return np.asarray(canvas.reduce(ss), np.float32) / 255


def _fashion_mask(item, flip, r, size, cx, cy) -> tuple[np.ndarray, np.ndarray]:
    """(mask, shade), both (r, r): the item's silhouette, holes filled, upscaled smoothly with a 1-pixel
    anti-aliased edge, and a mild, blurred shading from its gray levels (at most 8% darker) that keeps seams and
    soles visible without drawing a texture of its own."""
    from scipy.ndimage import binary_erosion, binary_fill_holes, gaussian_filter

    item = item[:, ::-1] if flip else item
    rows, cols = np.nonzero(item > 10)
    pad = 2  # room for the smoothed edge around the tight crop
    crop = np.pad(item[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1], pad).astype(np.float32) / 255
    # Fashion-MNIST edges are anti-aliased gray ramps over an exactly black background: a smooth field whose 0.4
    # level is the outline, relative to the item's own brightness (a black shirt is all in 1..60), and solid inside:
    # dark prints are not holes (gaps between sandal straps reach the outside and stay open).
    inside = crop > 0
    relative = np.clip(crop / (0.2 * np.percentile(crop[inside], 95)), 0, 1)
    field = np.where(binary_erosion(binary_fill_holes(inside)), 1.0, relative)
    field = gaussian_filter(field, 0.5).astype(np.float32)
    scale = size * r / (max(crop.shape) - 2 * pad)  # output pixels per Fashion-MNIST pixel
    w, h = round(crop.shape[1] * scale), round(crop.shape[0] * scale)
    up_field = np.asarray(Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC))
    up = np.asarray(Image.fromarray(gaussian_filter(crop, 1.0)).resize((w, h), Image.Resampling.BICUBIC))
    x0, y0 = round(cx * r - w / 2), round(cy * r - h / 2)
    # Clip the paste window to the frame (an object may poke a little outside it).
    sx0, sy0, sx1, sy1 = max(0, -x0), max(0, -y0), min(w, r - x0), min(h, r - y0)
    mask, shade = np.zeros((r, r), np.float32), np.ones((r, r), np.float32)
    region = (slice(y0 + sy0, y0 + sy1), slice(x0 + sx0, x0 + sx1))
    # The field ramps from 0 to 1 over about `scale` pixels at an edge; steepen it to one pixel. The gain is at
    # least 2 so that the blurred field's faint tails (below 0.15) stay at mask 0: at gain 1 a small item's whole
    # paste window showed as a faint box (mask 0.1), a shortcut to "Fashion-MNIST item" that no shape has.
    mask[region] = np.clip((up_field[sy0:sy1, sx0:sx1] - 0.4) * max(scale, 2.0) + 0.5, 0, 1)
    bright = max(float(np.percentile(up[up_field > 0.4], 95)), 0.05)
    shade[region] = 0.92 + 0.08 * np.clip(up[sy0:sy1, sx0:sx1] / bright, 0, 1)
    return mask, shade


def _texture(rng, texture, r, size, cx, cy) -> np.ndarray | None:
    """(r, r) coverage of the texture's pattern in [0, 1] (None for plain), anti-aliased analytically.

    Scales are fractions of the object (so a pattern looks alike on any object) with floors in frame fractions
    (so it stays readable at 64 px: stripes >= 5.4 px per period, dots >= 7 px apart, checks >= 4.5 px)."""
    if texture == "plain":
        return None
    xs, ys = _pixel_grid(r)
    angle = rng.uniform(0, np.pi)
    x, y = xs - cx * r, ys - cy * r
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    if texture == "striped":
        period = max(size / rng.uniform(3.5, 6.0), 0.085) * r
        duty = rng.uniform(0.4, 0.5)
        t = (u / period + rng.uniform(0, 1)) % 1.0
        signed = np.where(t < duty, np.minimum(t, duty - t), -np.minimum(t - duty, 1 - t)) * period
        return np.clip(signed + 0.5, 0, 1)
    if texture == "dotted":
        spacing = max(size / rng.uniform(3.5, 5.5), 0.11) * r
        radius = spacing * rng.uniform(0.24, 0.32)
        gu, gv = u / spacing + rng.uniform(0, 1), v / spacing + rng.uniform(0, 1)
        if rng.random() < 0.5:  # staggered (hexagonal-ish) rows
            gu = gu + 0.5 * (np.floor(gv + 0.5) % 2)
        dist = np.hypot(gu - np.round(gu), gv - np.round(gv)) * spacing
        return np.clip(radius - dist + 0.5, 0, 1)
    if texture == "checkered":
        cell = max(size / rng.uniform(4.0, 7.0), 0.07) * r
        gu, gv = u / cell + rng.uniform(0, 2), v / cell + rng.uniform(0, 2)
        fu, fv = gu - np.floor(gu), gv - np.floor(gv)
        edge = np.minimum(np.minimum(fu, 1 - fu), np.minimum(fv, 1 - fv)) * cell  # distance to the cell border
        odd = (np.floor(gu) + np.floor(gv)) % 2 == 1
        return np.clip(np.where(odd, 0.5 + edge, 0.5 - edge), 0, 1)
    raise ValueError(f"unknown texture {texture!r}")


def _render(
    rng, category, color, texture, position, image_size, fashion_item, flip, photo_probability
) -> tuple[Image.Image, str]:
    """Draw one toy-world image at ``image_size``, anti-aliased analytically (textures, silhouette edges) rather
    than by supersampling. Every random choice comes from ``rng`` in an order that does not depend on
    ``image_size``, so one (seed, split, index) is the same scene at every resolution."""
    r = image_size
    fill, pattern, hue = _draw_colors(rng, color)
    size, cx, cy = _placement(rng, position)
    if fashion_item is None:
        mask, shade = _shape_mask(rng, category, r, size, cx, cy), None
    else:
        mask, shade = _fashion_mask(fashion_item, flip, r, size, cx, cy)
    coverage = _texture(rng, texture, r, size, cx, cy)
    background, background_name = _background(rng, r, color, fill, hue, photo_probability)

    obj = np.broadcast_to(fill, (r, r, 3)) if coverage is None else fill + coverage[..., None] * (pattern - fill)
    if shade is not None:
        obj = obj * shade[..., None]
    pixels = background + mask[..., None] * (obj - background)  # (r, r, 3)
    return Image.fromarray((pixels * 255 + 0.5).astype(np.uint8)), background_name


# --- the toy world data set ---------------------------------------------------------------------------------------


@dataclass
class ToySample:
    image: Image.Image  # RGB, image_size x image_size
    category: str
    color: str
    texture: str
    background: str  # "plain" or "photo:<skimage name>"
    position: str  # one of POSITIONS
    caption: str  # canonical_caption(color, texture, category)
    index: int
    split: str


@dataclass(frozen=True)
class _Draw:
    """The choices made before rendering; ``silhouette`` names the Fashion-MNIST item or the procedural shape."""

    category: str
    color: str
    texture: str
    position: str
    silhouette: str
    fashion_item: np.ndarray | None
    flip: bool


class ToyWorld(Dataset):
    """Map-style toy-world data set: ``world[i]`` is a ``ToySample``, identical for identical (seed, split, i).

    Categories cycle with the index (balanced); colour, texture, position and everything else are drawn from a
    generator seeded by (seed, split, i). ``exclude_combinations`` holds (color, texture, category) triples that are
    never generated (e.g. ``holdout_combinations()`` in train). Fashion categories need Fashion-MNIST
    (``MissingDataError`` otherwise); ``categories=SHAPE_CATEGORIES`` needs no data set.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 10_000,  # number of items; any index below it is a distinct image
        image_size: int = 64,  # output side in pixels
        seed: int = 0,
        categories: Sequence[str] = CATEGORIES,
        exclude_combinations: Iterable[tuple[str, str, str]] = (),
        photo_probability: float = 0.5,  # share of backgrounds that are photo crops rather than plain tones
        fashion_mnist_dir: str | os.PathLike | None = None,
    ):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        unknown = [c for c in categories if c not in CATEGORIES]
        if unknown or not categories:
            raise ValueError(f"unknown categories {unknown}; choose from {CATEGORIES}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {image_size}")
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        self.categories = tuple(categories)
        self.photo_probability = photo_probability
        excluded = set(exclude_combinations)
        self._pairs = {}  # category -> allowed (color, texture) pairs
        for category in self.categories:
            self._pairs[category] = [(c, t) for c in COLORS for t in TEXTURES if (c, t, category) not in excluded]
            if not self._pairs[category]:
                raise ValueError(f"exclude_combinations leaves no colour/texture for {category!r}")
        self._fashion = None
        if any(c in FASHION_CATEGORIES for c in self.categories):
            # train: Fashion-MNIST train items; val / test: even / odd items of Fashion-MNIST test.
            fm_split = "train" if split == "train" else "test"
            images, labels = load_fashion_mnist(fm_split, fashion_mnist_dir)
            items = np.arange(len(labels))
            if split != "train":
                items = items[(split == "test") :: 2]
            pools = {FASHION_CATEGORIES[k]: items[labels[items] == k] for k in range(len(FASHION_CATEGORIES))}
            empty = [c for c in self.categories if c in pools and not len(pools[c])]
            if empty:
                raise DataError(f"Fashion-MNIST {fm_split} has no {', '.join(empty)} items for the {split} split")
            self._fashion = (fm_split, images, pools)

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS[self.split], index]))

    def _draw(self, index: int) -> tuple[np.random.Generator, _Draw]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a ToyWorld of size {self.size}")
        rng = self._rng(index)
        category = self.categories[index % len(self.categories)]
        pairs = self._pairs[category]
        color, texture = pairs[rng.integers(len(pairs))]
        position = POSITIONS[rng.integers(len(POSITIONS))]
        flip = bool(rng.random() < 0.5)
        if category in FASHION_CATEGORIES:
            fm_split, images, pools = self._fashion
            item = int(pools[category][rng.integers(len(pools[category]))])
            silhouette, fashion_item = f"fashion-mnist-{fm_split}/{item}", images[item]
        else:
            silhouette, fashion_item = f"shape/{self.split}/{index}", None
        return rng, _Draw(category, color, texture, position, silhouette, fashion_item, flip)

    def silhouette_id(self, index: int) -> str:
        """Which silhouette item ``index`` uses: "fashion-mnist-train/123", "fashion-mnist-test/4567" or
        "shape/<split>/<index>" (a procedural shape, its geometry drawn from this split's seeds)."""
        return self._draw(index)[1].silhouette

    def __getitem__(self, index: int) -> ToySample:
        index = int(index)
        rng, d = self._draw(index)
        image, background = _render(
            rng, d.category, d.color, d.texture, d.position, self.image_size, d.fashion_item, d.flip,
            self.photo_probability,
        )
        caption = canonical_caption(d.color, d.texture, d.category)
        return ToySample(image, d.category, d.color, d.texture, background, d.position, caption, index, self.split)


def colorized_fashion_mnist(
    split: str = "test",
    n: int = 500,
    image_size: int = 64,
    seed: int = 0,
    fashion_mnist_dir: str | os.PathLike | None = None,
) -> list[ToySample]:
    """``n`` Fashion-MNIST items (a seeded choice from ``split``), each centred, coloured with a known colour and
    texture on a plain background: a simple evaluation set (sample split "fmnist-<split>")."""
    images, labels = load_fashion_mnist(split, fashion_mnist_dir)
    name = f"fmnist-{split}"
    order = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[name]])).permutation(len(labels))[:n]
    samples = []
    for index, item in enumerate(order):
        rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[name], index]))
        category = FASHION_CATEGORIES[labels[item]]
        color, texture = COLORS[rng.integers(len(COLORS))], TEXTURES[rng.integers(len(TEXTURES))]
        image, background = _render(rng, category, color, texture, "center", image_size, images[item], False, 0.0)
        caption = canonical_caption(color, texture, category)
        samples.append(ToySample(image, category, color, texture, background, "center", caption, index, name))
    return samples


def natural_eval_images() -> dict[str, Image.Image]:
    """The held-out natural photos (astronaut, coffee, chelsea, rocket) from skimage.data, as RGB."""
    import skimage.data

    return {name: to_rgb(Image.fromarray(getattr(skimage.data, name)())) for name in NATURAL_EVAL_IMAGES}


def collate_toy(samples: Sequence[ToySample], preprocess: Callable[[list[Image.Image]], torch.Tensor]) -> dict:
    """Batch toy samples: pixel_values from the caller's ``preprocess`` (the tokenizer's), canonical captions, and
    LongTensor labels per attribute (indices into ``ATTRIBUTES[attr]``)."""
    return {
        "pixel_values": preprocess([s.image for s in samples]),
        "captions": [s.caption for s in samples],
        "labels": {
            attr: torch.tensor([label_index(attr, getattr(s, attr)) for s in samples], dtype=torch.long)
            for attr in ATTRIBUTES
        },
    }


class ToyBatchCollator:
    """``collate_toy`` with its ``preprocess`` bound, picklable for DataLoader workers."""

    def __init__(self, preprocess: Callable[[list[Image.Image]], torch.Tensor]):
        self.preprocess = preprocess

    def __call__(self, samples: Sequence[ToySample]) -> dict:
        return collate_toy(samples, self.preprocess)


def save_grid(items: Sequence, path: str | os.PathLike, ncol: int = 8, pad: int = 2) -> Path:
    """Save a contact sheet PNG of ToySamples or images (anything ``load_image`` reads), ``ncol`` per row."""
    images = [load_image(item.image if isinstance(item, ToySample) else item) for item in items]
    if not images:
        raise ValueError("save_grid needs at least one image")
    w, h = max(im.width for im in images), max(im.height for im in images)
    nrow = -(-len(images) // ncol)
    sheet = Image.new("RGB", (ncol * (w + pad) + pad, nrow * (h + pad) + pad), (255, 255, 255))
    for k, im in enumerate(images):
        sheet.paste(im, (pad + (k % ncol) * (w + pad), pad + (k // ncol) * (h + pad)))
    path = Path(path)
    sheet.save(path)
    return path


# --- real-scale loaders -------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursive) as ``(RGB image, caption or None)``; the caption is the text of a
    same-name ``.txt`` beside the image. An unreadable file is skipped (the next index is returned), counted in
    ``.skipped`` and warned about once; counts are per process, so per DataLoader worker."""

    def __init__(
        self,
        root: str | os.PathLike,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        captions: bool = True,
        max_pixels: int = MAX_PIXELS,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder does not exist")
        extensions = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in extensions and p.is_file())
        if not self.paths:
            found = ", ".join(sorted(extensions))
            raise DataError(f"{self.root}: no image files ({found}) found, searched recursively")
        self.captions, self.max_pixels = captions, max_pixels
        self.skipped = 0
        self._unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, str | None]:
        for offset in range(len(self.paths)):
            k = (index + offset) % len(self.paths)
            if k in self._unreadable:
                continue
            try:
                image = load_image(self.paths[k], self.max_pixels)
            except ImageInputError as exc:
                self._unreadable.add(k)
                self.skipped += 1
                logger.warning("skipping unreadable image: %s", exc)
                continue
            return image, self._caption(self.paths[k])
        raise DataError(f"{self.root}: none of the {len(self.paths)} image files can be read")

    def _caption(self, path: Path) -> str | None:
        text_path = path.with_suffix(".txt")
        if not self.captions or not text_path.is_file():
            return None
        return text_path.read_text(encoding="utf-8", errors="replace").strip()


class WebDatasetImages(IterableDataset):
    """Iterate ``(RGB image, caption or None)`` over webdataset tar shards (built by ``webdataset_images``).

    A sample without a readable jpg/jpeg/png/webp is skipped and counted in ``.skipped``; a shard or tar member
    that cannot be read is skipped and counted in ``.read_errors``. Counts are per process (per DataLoader worker).
    """

    def __init__(self, shards: list[str], shuffle_shards: bool = False, max_pixels: int = MAX_PIXELS):
        self.shards, self.shuffle_shards, self.max_pixels = shards, shuffle_shards, max_pixels
        self.skipped = 0
        self.read_errors = 0

    def _on_read_error(self, exc: Exception) -> bool:
        self.read_errors += 1
        logger.warning("skipping unreadable webdataset data: %s", exc)
        return True  # keep going

    def __iter__(self) -> Iterator[tuple[Image.Image, str | None]]:
        import webdataset as wds

        pipeline = wds.WebDataset(
            self.shards,
            handler=self._on_read_error,
            shardshuffle=len(self.shards) if self.shuffle_shards else False,
            nodesplitter=wds.split_by_node,
            empty_check=False,
        )
        for sample in pipeline:
            fields = {k.lower(): v for k, v in sample.items()}
            key = next((k for k in WEBDATASET_IMAGE_KEYS if k in fields), None)
            try:
                if key is None:
                    raise ImageInputError(f"no image ({'/'.join(WEBDATASET_IMAGE_KEYS)}) in the sample")
                image = load_image(fields[key], self.max_pixels)
            except ImageInputError as exc:
                self.skipped += 1
                logger.warning("skipping sample %s in %s: %s", fields.get("__key__"), fields.get("__url__"), exc)
                continue
            caption = fields.get("txt")
            yield image, caption.decode("utf-8", errors="replace").strip() if caption is not None else None


def webdataset_images(
    urls: str | os.PathLike | Sequence[str | os.PathLike], shuffle_shards: bool = False, max_pixels: int = MAX_PIXELS
) -> WebDatasetImages:
    """Image-caption pairs from webdataset shards: ``urls`` is a path, a glob ("shards/*.tar"), a brace range
    ("shard-{000..009}.tar"), a folder of .tar files, a remote URL or pipe: spec, or a list of these.
    Raises ``DataError`` when a named local shard does not exist, or a glob or folder holds no shard."""
    from braceexpand import braceexpand

    specs = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    shards, missing = [], []
    for spec in map(str, specs):
        for part in braceexpand(spec):
            if "://" in part or part.startswith("pipe:"):
                shards.append(part)
            elif any(c in part for c in "*?["):
                matched = sorted(glob.glob(part))
                shards.extend(matched)
                if not matched:  # a typo in one of several globs must not quietly shrink the data
                    missing.append(f"{part} (matches nothing)")
            elif Path(part).is_dir():
                matched = sorted(str(p) for p in Path(part).glob("*.tar"))
                shards.extend(matched)
                if not matched:
                    missing.append(f"{part} (a folder without .tar files)")
            elif Path(part).is_file():
                shards.append(part)
            else:
                missing.append(part)
    if missing:
        raise DataError(f"webdataset shards not found: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if not shards:
        raise DataError(f"no webdataset shards match {urls!r}")
    return WebDatasetImages(shards, shuffle_shards, max_pixels)
