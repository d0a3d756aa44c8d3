"""The demo model's training data: each caption says what its picture shows, measured on the drawn pixels."""
import numpy as np
import pytest

from coreml_sd.converter.models.demo_data import (
    BACKGROUNDS,
    COLOURS,
    POSITION_PHRASES,
    SHAPES,
    caption,
    draw,
    random_picture,
)

SIZE = 64


def shape_pixels(pixels: np.ndarray, grey: int) -> np.ndarray:
    """Where the picture differs from its plain background."""
    return np.abs(pixels.astype(int) - grey).max(axis=-1) > 40


def test_same_seed_same_pictures_and_captions():
    def sample(seed):
        rng = np.random.default_rng(seed)
        pictures = [random_picture(rng) for _ in range(5)]
        return [(p, caption(p, rng), draw(p, SIZE).tobytes()) for p in pictures]

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


@pytest.mark.parametrize("seed", range(60))
def test_caption_describes_the_drawn_picture(seed):
    rng = np.random.default_rng(seed)
    picture = random_picture(rng)
    text = caption(picture, rng)
    pixels = draw(picture, SIZE)
    mask = shape_pixels(pixels, picture.grey)
    assert mask.mean() > 0.02  # the shape is there
    inner = pixels[mask].astype(float)
    nearest = min(COLOURS, key=lambda name: np.linalg.norm(inner.mean(0) - COLOURS[name]))
    assert nearest == picture.colour
    background = "white" if pixels[~mask].mean() > 127 else "black"
    assert background == picture.background and BACKGROUNDS[background][0] <= picture.grey <= BACKGROUNDS[background][1]
    if not text:
        return
    assert picture.colour in text and picture.shape in text
    assert [shape for shape in SHAPES if shape in text] == [picture.shape]
    if "background" in text:
        assert picture.background in text
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() / SIZE, ys.mean() / SIZE
    for position, phrases in POSITION_PHRASES.items():
        if any(phrase in text for phrase in phrases):
            assert position == picture.position
            expected = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6,
                        "centre": abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1}[position]
            assert expected, (text, cx, cy)
