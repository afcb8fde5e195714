"""`Preprocessing`: how images were prepared when a backbone's weights were trained (the spec only; the image
transforms that follow it are `jaxtl.data.preprocess`). Every pretrained weight names its own; feeding its model
anything else costs accuracy."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from jaxtl.core.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocessing:
    """How images were prepared when the weights were trained.

    input_size: side of the square crop fed to the model.
    crop_fraction: crop side over the resized shorter side (0.875 resizes to 256 for a 224 crop).
    mean, std: per-channel normalisation of pixels scaled to [0, 1].
    interpolation: "bilinear", "bicubic" or "nearest".
    """

    input_size: int = 224
    crop_fraction: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation must be one of {list(INTERPOLATIONS)}, got '{self.interpolation}'")
        if not 0 < self.crop_fraction <= 1:
            raise ConfigError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop (timm's `floor(input_size / crop_pct)`)."""
        return int(math.floor(self.input_size / self.crop_fraction))

    def with_input_size(self, input_size: int) -> "Preprocessing":
        """The same recipe at another resolution (the crop fraction is kept)."""
        return dataclasses.replace(self, input_size=input_size)
