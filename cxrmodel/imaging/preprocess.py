"""Model input preprocessing: the one copy of resize, crop and normalisation in RadLens.

`ImagePreprocess` is read from the checkpoint's own ``preprocessor_config.json`` (the file a
Hugging Face image processor is saved to) so it matches the model, and it reproduces what
`CLIPImageProcessor` does -- shortest-edge bicubic resize, centre crop, rescale, normalise --
while resizing grayscale images on one channel instead of three, and shrinking an image many times the
model's input by a whole factor before the bicubic pass (`ImagePreprocess.reducing_gap`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"  # transformers 5: the image processor nested under "image_processor"
PROCESSOR_FILES = (PREPROCESSOR_FILE, PROCESSOR_FILE)  # looked for in this order
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePreprocess:
    """How a checkpoint wants its pixels: resize, crop and normalisation constants."""

    shortest_edge: int | None = 224
    resize_to: tuple[int, int] | None = None  # (height, width) when the processor resizes exactly
    crop: tuple[int, int] | None = (224, 224)
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    crop_rounding: str = "floor"  # the crop's offset: floor (transformers) or round (torchvision, open_clip)
    # An image more than 2 x this many times the model's input is first averaged over whole blocks (Pillow's
    # `reduce`), leaving the bicubic pass at least this many source pixels per output pixel; Pillow documents
    # 3.0 as indistinguishable from resampling the full image in most cases. A 3000 x 2500 film resizes ~4x
    # faster; an image under 6 x the input is resized exactly as transformers does. None: always in full.
    reducing_gap: float | None = 3.0

    @classmethod
    def from_dict(cls, cfg: dict) -> ImagePreprocess:
        """Build from the keys of a Hugging Face ``preprocessor_config.json``."""
        size = cfg.get("size", 224)
        shortest, exact = None, None
        if isinstance(size, int):
            shortest = size
        elif "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        else:
            exact = (int(size["height"]), int(size["width"]))
        crop = None
        if cfg.get("do_center_crop", shortest is not None):
            c = cfg.get("crop_size", shortest)
            crop = (int(c), int(c)) if isinstance(c, int) else (int(c["height"]), int(c["width"]))
        return cls(
            shortest_edge=shortest,
            resize_to=exact,
            crop=crop,
            mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
            std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)),
            resample=int(cfg.get("resample", Image.Resampling.BICUBIC)),
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ImagePreprocess:
        """Read a checkpoint directory's image-processor settings: ``preprocessor_config.json`` (the
        layout of older transformers and of the hub), else ``processor_config.json`` with the settings
        under ``image_processor`` (what transformers 5's ``CLIPProcessor.save_pretrained`` writes)."""
        for name in PROCESSOR_FILES:
            path = Path(directory) / name
            if path.exists():
                return cls.from_file(path)
        raise FileNotFoundError(f"{directory} has neither {PREPROCESSOR_FILE} nor {PROCESSOR_FILE}")

    @classmethod
    def from_file(cls, path: str | Path) -> ImagePreprocess:
        """Read one of the two processor files (ValueError when it holds no image-processor settings)."""
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        if Path(path).name == PROCESSOR_FILE:
            if not isinstance(cfg.get("image_processor"), dict):
                raise ValueError(f"{path} has no image_processor section")
            cfg = cfg["image_processor"]
        return cls.from_dict(cfg)

    def to_dict(self) -> dict:
        """The keys a Hugging Face image processor config would hold."""
        size = {"shortest_edge": self.shortest_edge} if self.shortest_edge else {
            "height": self.resize_to[0], "width": self.resize_to[1]}
        out = {"size": size, "do_resize": True, "do_center_crop": self.crop is not None,
               "image_mean": list(self.mean), "image_std": list(self.std), "resample": self.resample,
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "do_convert_rgb": True, "image_processor_type": "CLIPImageProcessor"}
        if self.crop:
            out["crop_size"] = {"height": self.crop[0], "width": self.crop[1]}
        return out

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the tensor a model receives."""
        if self.crop:
            return self.crop
        if self.resize_to:
            return self.resize_to
        return (self.shortest_edge, self.shortest_edge)

    @property
    def decode_side(self) -> int:
        """The side both of an image's sides must keep when it is decoded reduced for this model alone (a
        JPEG's DCT scaling, `cxrmodel.imaging.decode`): twice the side `resize` makes, so the bicubic resize
        still has at least two source pixels per output pixel to average."""
        if self.resize_to is not None:
            return 2 * max(self.resize_to)
        return 2 * self.shortest_edge

    def resize(self, image: Image.Image, full_size: tuple[int, int] | None = None, reduced_by: int = 1
               ) -> Image.Image:
        """Resize and crop one ``L`` or ``RGB`` image to the model's input size. `full_size` and `reduced_by`:
        `image` was decoded that many times smaller than a file of `full_size` (`DecodedImage`), its last
        column and row rounded up; sizes and crop then follow the full image, and the resize reads exactly
        the part of `image` that stands for it, as if the full image had been resized. The bicubic pass
        starts from `image` averaged over whole blocks where it is over 2 x `reducing_gap` times the target."""
        w, h = full_size or image.size
        if self.resize_to is not None:
            target = (self.resize_to[1], self.resize_to[0])
        else:
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.shortest_edge * long / short)
            target = (self.shortest_edge, new_long) if w <= h else (new_long, self.shortest_edge)
        if reduced_by > 1 and full_size is not None:
            image = image.resize(target, resample=self.resample, box=(0, 0, w / reduced_by, h / reduced_by),
                                 reducing_gap=self.reducing_gap)
        elif image.size != target:
            image = image.resize(target, resample=self.resample, reducing_gap=self.reducing_gap)
        if self.crop is not None:
            ch, cw = self.crop
            w, h = image.size
            top, left = self._offset(h, ch), self._offset(w, cw)
            if top < 0 or left < 0:  # image smaller than the crop: pad like transformers does
                canvas = Image.new(image.mode, (max(w, cw), max(h, ch)))
                canvas.paste(image, ((max(w, cw) - w) // 2, (max(h, ch) - h) // 2))
                image, w, h = canvas, canvas.width, canvas.height
                top, left = self._offset(h, ch), self._offset(w, cw)
            image = image.crop((left, top, left + cw, top + ch))
        return image

    def _offset(self, size: int, crop: int) -> int:
        """Where a centre crop starts: one pixel apart between the libraries when the margin is odd."""
        return int(round((size - crop) / 2.0)) if self.crop_rounding == "round" else (size - crop) // 2

    def pixels(self, image: Image.Image) -> np.ndarray:
        """Resized, cropped 8-bit pixels: (H, W) for grayscale, (H, W, 3) for colour."""
        return np.asarray(self.resize(image), dtype=np.uint8)

    def batch_tensor(self, pixel_arrays: list[np.ndarray]):
        """8-bit arrays from `pixels` -> normalised float32 torch tensor (B, 3, H, W)."""
        import torch  # decode workers import this module without paying for torch

        h, w = self.output_size
        out = np.empty((len(pixel_arrays), 3, h, w), dtype=np.float32)
        scale = (1.0 / (255.0 * np.asarray(self.std, dtype=np.float32)))[:, None, None]
        shift = (np.asarray(self.mean, dtype=np.float32) / np.asarray(self.std, dtype=np.float32))[:, None, None]
        for i, arr in enumerate(pixel_arrays):
            chw = arr[None] if arr.ndim == 2 else arr[..., :3].transpose(2, 0, 1)
            np.multiply(chw, scale, out=out[i], casting="unsafe")
            out[i] -= shift
        return torch.from_numpy(out)

    def to_tensor(self, images: list[Image.Image]):
        """A batch of ``L``/``RGB`` images -> normalised float32 torch tensor (B, 3, H, W)."""
        return self.batch_tensor([self.pixels(im) for im in images])
