"""The synthetic "shapes" world: vocabulary, scene sampler, renderer, captions and a pixel checker.

One small module, numpy, scipy and Pillow only (no Ray, no torch), so that the data job, the evaluation
code and the tests all read the same definitions. Geometry is in fractions of the image side, so
the same scene renders at any size; `render` and `detect` share `shape_mask`, so the checker judges
exactly the shapes the renderer draws.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {  # object colours, RGB
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 225, 20),
    "green": (30, 170, 50),
    "cyan": (0, 200, 220),
    "blue": (30, 80, 230),
    "purple": (140, 40, 200),
    "pink": (250, 130, 200),
}
BACKGROUNDS = {  # background colours, RGB; object colours are never drawn on a near twin
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "brown": (110, 70, 40),
    "navy": (20, 30, 90),
}
# The attribute columns every row of the source carries (what evaluation checks; the second object's
# are empty in single-object scenes).
SCENE_COLUMNS = (
    "background",
    "n_objects",
    "shape",
    "colour",
    "size",
    "position",
    "shape_2",
    "colour_2",
    "size_2",
    "position_2",
)
# Which attributes a row's caption names: SCENE_COLUMNS names separated by spaces ("background colour
# shape"); the rest of the scene is left open by the caption.
NAMED_COLUMN = "named"
SIZES = {"small": 0.30, "large": 0.46}  # object extent as a fraction of the image side
POSITIONS = {  # object centre as (x, y) fractions of the image side
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
# Colour+shape pairs that never appear in train or val: the held-out split tests composition.
# Each colour and each shape appears in at most one pair, so all of them are still seen in training.
HELDOUT_PAIRS = frozenset(
    {
        ("red", "star"),
        ("blue", "triangle"),
        ("green", "circle"),
        ("yellow", "cross"),
        ("purple", "square"),
        ("orange", "diamond"),
    }
)
# How often a caption names each attribute (the synthetic source's `naming` default): colour and shape
# nearly always, size and position about half the time, the background less often; `second_object` is
# how often a two-object caption mentions the second object at all. What a caption leaves open is
# what the image embedding has to carry (and what a sampled prior can vary).
NAMING = {"colour": 0.95, "shape": 0.95, "size": 0.5, "position": 0.5, "background": 0.3, "second_object": 0.7}
OBJECT_ATTRIBUTES = ("colour", "shape", "size", "position")  # named per object ('colour_2' for the second)
NAMEABLE = (*OBJECT_ATTRIBUTES, "background")
# Wording: each attribute value has several phrasings; the first is the canonical one (zero-shot
# prompts, `caption(scene)` without a generator).
SHAPE_WORDS = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box"),
    "triangle": ("triangle", "three-sided shape"),
    "star": ("star", "five-pointed star"),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus"),
}
UNNAMED_SHAPE_WORDS = ("shape", "object", "thing", "figure")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
POSITION_WORDS = {
    "top left": ("at the top left", "in the top left corner", "in the upper left"),
    "top right": ("at the top right", "in the top right corner", "in the upper right"),
    "bottom left": ("at the bottom left", "in the bottom left corner", "in the lower left"),
    "bottom right": ("at the bottom right", "in the bottom right corner", "in the lower right"),
    "center": ("in the center", "in the middle", "centred"),
}
BACKGROUND_AFTER = ("on a {} background", "against {}", "on {}", "over a {} backdrop")
BACKGROUND_BEFORE = ("{} background with", "on {},", "against {}:")
JOINERS = ("and", "and also", "next to")
BACKGROUND_FIRST = 0.3  # share of worded captions that open with the background
_SUPERSAMPLE = 4
_MIN_COLOUR_DISTANCE = 90.0  # RGB distance below which an object colour counts as the background


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object; `dx`, `dy` are a small jitter of its centre in fractions of the side."""

    shape: str
    colour: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0


@dataclass(frozen=True)
class Scene:
    """A background and one or two objects: everything the renderer needs."""

    background: str
    objects: tuple[ShapeObject, ...] = field(default_factory=tuple)


def _distance(a, b) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def colours_allowed_on(background: str) -> list[str]:
    """Object colours far enough from `background` to be seen (and checked) on it."""
    bg = BACKGROUNDS[background]
    return [c for c, rgb in COLOURS.items() if _distance(rgb, bg) >= _MIN_COLOUR_DISTANCE]


def _pick(options: tuple[str, ...], rng: np.random.Generator | None) -> str:
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _object_phrase(obj: ShapeObject, named: set[str], suffix: str, rng: np.random.Generator | None) -> str:
    """'a small red circle at the top left' with only the attributes in `named` (names + suffix)."""
    has = lambda attribute: attribute + suffix in named  # noqa: E731
    noun = _pick(SHAPE_WORDS[obj.shape], rng) if has("shape") else _pick(UNNAMED_SHAPE_WORDS, rng)
    size = _pick(SIZE_WORDS[obj.size], rng) if has("size") else None
    colour = obj.colour if has("colour") else None
    form = 0 if rng is None else int(rng.integers(3))
    if form == 1 and size:  # 'a red circle, small,'
        text = _with_article(" ".join(w for w in (colour, noun) if w)) + f", {size},"
    elif form == 2 and colour:  # 'a small circle in red'
        text = _with_article(" ".join(w for w in (size, noun) if w)) + f" in {colour}"
    else:  # 'a small red circle'
        text = _with_article(" ".join(w for w in (size, colour, noun) if w))
    if has("position"):
        text += " " + _pick(POSITION_WORDS[obj.position], rng)
    return text.rstrip(",")


def choose_named(scene: Scene, rng: np.random.Generator, naming: dict[str, float] | None = None) -> tuple[str, ...]:
    """Which attributes a caption of `scene` names, each drawn with its `naming` probability (NAMING by
    default). Names are SCENE_COLUMNS names ('colour', 'shape_2', 'background'); every object a caption
    mentions keeps at least its shape or colour, so the caption says what it is about."""
    naming = {**NAMING, **(naming or {})}
    named = ["background"] if rng.random() < naming["background"] else []
    for i, _ in enumerate(scene.objects):
        suffix = "" if i == 0 else f"_{i + 1}"
        if i > 0 and rng.random() >= naming["second_object"]:
            break
        chosen = [a for a in OBJECT_ATTRIBUTES if rng.random() < naming[a]]
        if not {"colour", "shape"} & set(chosen):
            chosen.append("shape")
        named += [a + suffix for a in chosen]
    return tuple(sorted(named))


def caption(
    scene: Scene, named: tuple[str, ...] | set[str] | None = None, rng: np.random.Generator | None = None
) -> str:
    """A caption of `scene` naming the attributes in `named` (default: all of them), worded by `rng`
    (synonyms and word orders; without one, the canonical wording:
    'a small red circle at the top left on a black background')."""
    if named is None:
        named = {a + ("" if i == 0 else f"_{i + 1}") for i in range(len(scene.objects)) for a in OBJECT_ATTRIBUTES}
        named |= {"background"}
    named = set(named)
    objects = [
        _object_phrase(obj, named, "" if i == 0 else f"_{i + 1}", rng)
        for i, obj in enumerate(scene.objects)
        if i == 0 or any(a.endswith(f"_{i + 1}") for a in named)
    ]
    joiner = _pick(JOINERS, rng)
    text = f" {joiner} ".join(objects)
    if "background" not in named:
        return text
    if rng is not None and rng.random() < BACKGROUND_FIRST:  # background first: 'navy background with a red circle'
        return _pick(BACKGROUND_BEFORE, rng).format(scene.background) + " " + text
    return text + " " + _pick(BACKGROUND_AFTER, rng).format(scene.background)


def sample_scene(rng: np.random.Generator, *, n_objects: int = 1, heldout: bool = False) -> Scene:
    """Draw a scene; `heldout` selects only HELDOUT_PAIRS, otherwise they are never drawn."""
    background = str(rng.choice(list(BACKGROUNDS)))
    allowed = colours_allowed_on(background)
    pairs = [(c, s) for c in allowed for s in SHAPES if ((c, s) in HELDOUT_PAIRS) == heldout]
    positions = list(POSITIONS)
    chosen_positions = [positions[i] for i in rng.permutation(len(positions))[:n_objects]]
    objects, used_colours = [], set()
    for position in chosen_positions:
        candidates = [p for p in pairs if p[0] not in used_colours]
        colour, shape = candidates[int(rng.integers(len(candidates)))]
        used_colours.add(colour)
        # Two objects are both small so they never overlap; one object picks its size.
        size = "small" if n_objects > 1 else str(rng.choice(list(SIZES)))
        dx, dy = (float(v) for v in rng.uniform(-0.03, 0.03, size=2))
        objects.append(ShapeObject(shape, colour, size, position, round(dx, 4), round(dy, 4)))
    return Scene(background, tuple(objects))


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of `shape` centred at (cx, cy) with half-extent r; None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "cross":
        a = r / 3
        return [
            (cx - a, cy - r),
            (cx + a, cy - r),
            (cx + a, cy - a),
            (cx + r, cy - a),
            (cx + r, cy + a),
            (cx + a, cy + a),
            (cx + a, cy + r),
            (cx - a, cy + r),
            (cx - a, cy + a),
            (cx - r, cy + a),
            (cx - r, cy - a),
            (cx - a, cy - a),
        ]
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(cx + float(q * np.cos(a)), cy + float(q * np.sin(a))) for q, a in zip(radii, angles)]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    polygon = shape_polygon(shape, cx, cy, r)
    if polygon is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image, anti-aliased by supersampling."""
    side = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fx, fy = POSITIONS[obj.position]
        r = SIZES[obj.size] * side / 2
        _draw_shape(draw, obj.shape, (fx + obj.dx) * side, (fy + obj.dy) * side, r, COLOURS[obj.colour])
    return image.reduce(_SUPERSAMPLE)


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    """JPEG bytes of an image; deterministic for the same pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ---------------------------------------------------------------- checker


@dataclass(frozen=True)
class Detection:
    """An object found by `detect`, named in the vocabulary."""

    colour: str
    shape: str
    size: str
    position: str
    area: float  # fraction of the image covered


def _template(shape: str) -> Image.Image:
    """`shape` drawn large in white on black and cropped to its tight bounding box."""
    side = 64 * _SUPERSAMPLE
    canvas = Image.new("L", (side, side), 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, side / 2, side / 2, side * 0.45, 255)
    return canvas.crop(canvas.getbbox())


_TEMPLATES = {shape: _template(shape) for shape in SHAPES}
# Share of its tight bounding box that each shape covers, and that box's side relative to 2r.
_FILL = {s: float(np.asarray(t).mean() / 255) for s, t in _TEMPLATES.items()}
_EXTENT = {s: max(t.size) / (64 * _SUPERSAMPLE * 0.9) for s, t in _TEMPLATES.items()}


def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Coverage in [0, 1] of `shape` stretched to fill a width×height box (its tight bounding box)."""
    return np.asarray(_TEMPLATES[shape].resize((width, height), Image.BOX), np.float64) / 255


def _nearest(rgb, palette: dict[str, tuple[int, int, int]]) -> tuple[str, float]:
    names = list(palette)
    d = np.linalg.norm(np.asarray([palette[n] for n in names], np.float64) - rgb, axis=1)
    return names[int(d.argmin())], float(d.min())


def _as_array(image) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {array.shape}")
    return array.astype(np.float64)


def detect_background(image) -> str:
    """Name of the background: the palette entry nearest the median border pixel."""
    a = _as_array(image)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return _nearest(np.median(border, axis=0), BACKGROUNDS)[0]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def _name_object(alpha: np.ndarray, colour: str) -> Detection | None:
    """Name shape, size and position of one object from its coverage map (H, W) in [0, 1]."""
    h, w = alpha.shape
    scores = dict.fromkeys(SHAPES, 0.0)
    for level in (0.25, 0.5):  # the tight box is fuzzy at low resolution: try two cuts, keep the best
        ys, xs = np.nonzero(alpha >= level)
        if len(ys) == 0:
            return None
        top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        crop = alpha[top:bottom, left:right]
        for shape in SHAPES:
            template = shape_mask(shape, right - left, bottom - top)
            score = np.minimum(crop, template).sum() / np.maximum(crop, template).sum()
            scores[shape] = max(scores[shape], float(score))
    shape = max(scores, key=scores.get)
    area = float(alpha.sum() / (h * w))
    # Size: compare the covered area with what each size of this shape covers (geometric midpoint).
    expected = {s: _FILL[shape] * (_EXTENT[shape] * f) ** 2 for s, f in SIZES.items()}
    size = min(expected, key=lambda s: abs(np.log(area / expected[s])))
    total = alpha.sum()
    centre = (
        (alpha.sum(axis=0) * np.arange(w)).sum() / total / w,
        (alpha.sum(axis=1) * np.arange(h)).sum() / total / h,
    )
    position = min(POSITIONS, key=lambda p: _distance(POSITIONS[p], centre))
    return Detection(colour, shape, size, position, area)


def detect(image, min_area: float = 0.01) -> list[Detection]:
    """Objects in an image, largest first: one per object colour present, named by template match.

    Pixels are labelled with their nearest object colour; the largest connected region of each
    colour is one object; its coverage (alpha between background and object colour) is matched
    against each shape's template.
    """
    a = _as_array(image)
    h, w, _ = a.shape
    bg = np.asarray(BACKGROUNDS[detect_background(a)], np.float64)
    palette = np.asarray(list(COLOURS.values()), np.float64)  # (C, 3)
    distances = np.linalg.norm(a[:, :, None, :] - palette[None, None], axis=3)  # (H, W, C)
    label = distances.argmin(axis=2)
    solid = (distances.min(axis=2) < _MIN_COLOUR_DISTANCE) & (
        np.linalg.norm(a - bg, axis=2) >= _MIN_COLOUR_DISTANCE / 2
    )
    found = []
    for index, colour in enumerate(COLOURS):
        mask = solid & (label == index)
        if mask.sum() < min_area * h * w:
            continue
        region = ndimage.binary_dilation(_largest_component(mask), iterations=2)
        direction = palette[index] - bg
        alpha = np.clip(((a - bg) @ direction) / (direction @ direction), 0.0, 1.0) * region
        detection = _name_object(alpha, colour)
        if detection is not None and detection.area >= min_area:
            found.append(detection)
    return sorted(found, key=lambda d: -d.area)


def shows(image, *, colour=None, shape=None, size=None, position=None, background=None) -> bool:
    """Does the image show an object with all the given attributes (and the given background)?

    >>> shows(render(Scene("gray", (ShapeObject("circle", "red", "large", "top left"),))),
    ...       colour="red", shape="circle", position="top left")
    True
    """
    if background is not None and detect_background(image) != background:
        return False
    wanted = {"colour": colour, "shape": shape, "size": size, "position": position}
    for det in detect(image):
        if all(v is None or getattr(det, k) == v for k, v in wanted.items()):
            return True
    return False


def attribute_accuracy(image, obj: ShapeObject) -> dict[str, bool]:
    """Per-attribute agreement of the largest detected object with `obj` (for single-object scenes)."""
    found = detect(image)
    if not found:
        return {"colour": False, "shape": False, "size": False, "position": False}
    det = found[0]
    return {k: getattr(det, k) == getattr(obj, k) for k in ("colour", "shape", "size", "position")}
