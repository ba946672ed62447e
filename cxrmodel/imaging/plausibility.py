"""Is this plausibly a radiological image at all? Model-free image statistics that catch what no medical
model should be asked about: noise, flat colours, smooth synthetic gradients, strongly coloured pictures
(photographs, logos, fundus photos), tiny images, line art on a white page.

Pure numpy on a copy of at most 256 px. Each rule has a measured basis (`python -m bench.ood`): on the
1,638 real images of the shared dev corpus (X-ray, CT, MRI; 64-256 px) none is flagged, the closest
values being colourfulness 9.9 (figure crops with coloured arrows), neighbour correlation 0.888 (64 px
films), quadratic-fit R^2 0.905 and contrast 14.8. Not caught: grayscale photographs of natural scenes
(a camera man, coins, the moon) -- their statistics overlap radiographs'; the model's applicability
check is all that stands there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .decode import DecodedImage


@dataclass(frozen=True)
class PlausibilityConfig:
    """Limits of the rules (data; see the module docstring for the measured margins)."""

    min_side: int = field(default=32, metadata={"help": "A shorter side than this is not a medical image."})
    max_colourfulness: float = field(default=20.0, metadata={
        "help": "Hasler-Suesstrunk colourfulness (0 for gray); photographs score 35-80, the corpus at most 9.9."})
    min_contrast: float = field(default=5.0, metadata={"help": "Gray-level standard deviation; flat images ~0."})
    min_neighbour_correlation: float = field(default=0.8, metadata={
        "help": "Correlation of adjacent pixels; noise ~0, text and textures 0.6-0.75, the corpus >= 0.888."})
    max_smooth_fit: float = field(default=0.94, metadata={
        "help": "R^2 of a quadratic surface fitted to the gray levels; synthetic gradients >= 0.95, corpus <= 0.905."})
    max_white_page: float = field(default=0.6, metadata={
        "help": "Share of pixels within 8 levels of a bright (>180) most common level: drawings on white paper."})


@dataclass(frozen=True)
class Plausibility:
    """The verdict and the measurements behind it."""

    radiological: bool
    reason: str
    measures: dict


def measure(image: Image.Image) -> dict:
    """The statistics the rules use, on a copy at most 256 px on its long side (only the size for an image
    under 3 px on a side, where neighbours and surfaces are undefined)."""
    if min(image.size) < 3:
        return {"side": min(image.size)}
    small = image.convert("RGB")
    small.thumbnail((256, 256))
    rgb = np.asarray(small, dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    gray = rgb.mean(axis=2)
    levels = np.bincount(np.clip(np.round(gray), 0, 255).astype(int).ravel(), minlength=256)
    mode = int(levels.argmax())
    return {
        "side": min(image.size),
        "colourfulness": float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())),
        "contrast": float(gray.std()),
        "neighbour_correlation": min(_correlation(gray[:, :-1], gray[:, 1:]), _correlation(gray[:-1], gray[1:])),
        "smooth_fit": _quadratic_r2(gray),
        "white_page": float(levels[max(0, mode - 8):mode + 9].sum() / gray.size) if mode > 180 else 0.0,
    }


def assess(image: Image.Image, config: PlausibilityConfig = PlausibilityConfig()) -> Plausibility:
    """Apply the rules in order; the first that fires names the reason."""
    m = measure(image)
    if m["side"] < config.min_side:
        return Plausibility(False, f"{m['side']} px: too small to be a medical image", m)
    rules = (
        (m["contrast"] < config.min_contrast, "a flat image (no structure)"),
        (m["colourfulness"] > config.max_colourfulness,
         f"a strongly coloured picture (colourfulness {m['colourfulness']:.0f}; radiological images are gray)"),
        (m["neighbour_correlation"] < config.min_neighbour_correlation,
         f"noise or fine texture (adjacent pixels correlate {m['neighbour_correlation']:.2f})"),
        (m["smooth_fit"] > config.max_smooth_fit, "a smooth synthetic gradient"),
        (m["white_page"] > config.max_white_page, "a drawing or text on a white page"),
    )
    for fired, reason in rules:
        if fired:
            return Plausibility(False, reason, m)
    return Plausibility(True, "image statistics within the range of radiological images", m)


def assess_image(image: Image.Image | DecodedImage) -> Plausibility:
    """`assess` of a PIL image, or of a `DecodedImage`: measured once and kept on it, however many answers
    ask (an upload's similar cases and its labels both do)."""
    if not isinstance(image, DecodedImage):
        return assess(image)
    if image.plausibility is None:
        image.plausibility = assess(image.image)
    return image.plausibility


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.ravel() - x.mean(), y.ravel() - y.mean()
    scale = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / scale) if scale > 0 else 1.0


def _quadratic_r2(gray: np.ndarray) -> float:
    if gray.var() == 0 or min(gray.shape) < 3:
        return 1.0
    h, w = gray.shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    design = np.stack([np.ones_like(xx), xx, yy, xx * xx, yy * yy, xx * yy], -1).reshape(-1, 6)
    coef, *_ = np.linalg.lstsq(design, gray.ravel(), rcond=None)
    return float(1 - (gray.ravel() - design @ coef).var() / gray.var())
