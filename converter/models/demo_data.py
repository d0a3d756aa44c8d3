"""What the `demo` model was trained on: one coloured shape on a plain light or dark background, and its caption.

The vocabulary below is all the model knows; the tests measure its pictures against the same table.
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {  # sRGB
    "red": (220, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 205, 25),
    "green": (35, 160, 60),
    "blue": (35, 85, 215),
    "purple": (135, 55, 185),
}
SHAPES = ("circle", "square", "triangle", "star")
# Where a placed shape's centre is, as fractions of the width and height (x to the right, y down).
POSITIONS = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "centre": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "centre": ("in the centre", "in the center", "in the middle"),
}
SIZES = {"small": 0.13, "large": 0.22}  # the shape's radius as a fraction of the side
BACKGROUNDS = {"white": (225, 255), "black": (0, 30)}  # the range of the grey level
POSITION_JITTER = 0.05
COLOUR_JITTER = 12
UNPLACED_FRACTION = 0.3  # pictures whose shape sits anywhere, so their captions name no position
EMPTY_CAPTION_FRACTION = 0.1  # the unconditional case of classifier-free guidance

# The prompts of the training script's sample grids.
SAMPLE_PROMPTS = (
    "a red circle on a white background",
    "a blue star on the left, black background",
    "a large yellow square on a black background",
    "a small green triangle at the top, white background",
    "a purple circle on the right, black background",
    "an orange star at the bottom, white background",
)


@dataclass(frozen=True)
class ShapePicture:
    shape: str
    colour: str
    size: str
    position: str | None  # a key of POSITIONS, or None for a shape anywhere
    x: float
    y: float
    rgb: tuple[int, int, int]
    background: str
    grey: int


def random_picture(rng: np.random.Generator) -> ShapePicture:
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    radius = SIZES[size]
    if rng.random() < UNPLACED_FRACTION:
        position = None
        x, y = rng.uniform(radius, 1 - radius, 2)
    else:
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        x, y = np.asarray(POSITIONS[position]) + rng.uniform(-POSITION_JITTER, POSITION_JITTER, 2)
    rgb = tuple(int(np.clip(c + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255)) for c in COLOURS[colour])
    grey = int(rng.integers(BACKGROUNDS[background][0], BACKGROUNDS[background][1] + 1))
    return ShapePicture(shape, colour, size, position, float(x), float(y), rgb, background, grey)


def shape_outline(shape: str, x: float, y: float, radius: float) -> list[tuple[float, float]] | None:
    """The polygon of a square, triangle or star around (x, y) (None for a circle); all upright."""
    if shape == "square":
        half = radius * 0.85  # about the circle's area
        return [(x - half, y - half), (x + half, y - half), (x + half, y + half), (x - half, y + half)]
    if shape == "triangle":
        corners = [np.pi / 2 + k * 2 * np.pi / 3 for k in range(3)]
        return [(x + radius * np.cos(a), y - radius * np.sin(a)) for a in corners]
    if shape == "star":
        points = [np.pi / 2 + k * np.pi / 5 for k in range(10)]
        radii = [radius if k % 2 == 0 else radius * 0.45 for k in range(10)]
        return [(x + r * np.cos(a), y - r * np.sin(a)) for a, r in zip(points, radii)]
    return None


def draw(picture: ShapePicture, size: int, supersampling: int = 4) -> np.ndarray:
    """The picture as (size, size, 3) uint8, drawn large and reduced so that its edges are antialiased."""
    side = size * supersampling
    image = Image.new("RGB", (side, side), (picture.grey,) * 3)
    canvas = ImageDraw.Draw(image)
    x, y, radius = picture.x * side, picture.y * side, SIZES[picture.size] * side
    outline = shape_outline(picture.shape, x, y, radius)
    if outline is None:
        canvas.ellipse([x - radius, y - radius, x + radius, y + radius], fill=picture.rgb)
    else:
        canvas.polygon(outline, fill=picture.rgb)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


def caption(picture: ShapePicture, rng: np.random.Generator) -> str:
    """One of the captions that describe the picture (attributes left out at random, which then mean "any")."""
    if rng.random() < EMPTY_CAPTION_FRACTION:
        return ""
    words = [picture.size] if rng.random() < 0.6 else []
    words += [picture.colour, picture.shape]
    text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    placed = picture.position is not None and rng.random() < 0.85
    if placed:
        phrases = POSITION_PHRASES[picture.position]
        text += " " + phrases[rng.integers(len(phrases))]
    if rng.random() < 0.85:
        on_a = not placed and rng.random() < 0.5
        text += f" on a {picture.background} background" if on_a else f", {picture.background} background"
    return text
