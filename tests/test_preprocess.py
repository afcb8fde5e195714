"""Preprocessing against torchvision's transforms, and real-world image modes."""

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from jaxtl.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, ImageReadError, Preprocessing, eval_transform, load_image


def _photo(tmp_path, size=(301, 217)):
    rng = np.random.RandomState(0)
    pixels = (rng.rand(size[1] // 8 + 1, size[0] // 8 + 1, 3) * 255).astype(np.uint8)
    image = Image.fromarray(pixels).resize(size, Image.BICUBIC)  # smooth, photo-like content
    path = tmp_path / "photo.jpg"
    image.save(path, quality=95)
    return path


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_matches_torchvision_resize_crop_normalize(tmp_path, interpolation):
    path = _photo(tmp_path)
    prep = Preprocessing(224, 224 / 256, IMAGENET_MEAN, IMAGENET_STD, interpolation)
    mode = {"bilinear": transforms.InterpolationMode.BILINEAR, "bicubic": transforms.InterpolationMode.BICUBIC}
    reference = transforms.Compose([
        transforms.Resize(256, interpolation=mode[interpolation]),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    expected = reference(Image.open(path).convert("RGB")).numpy().transpose(1, 2, 0)
    actual = eval_transform(path, prep)
    assert actual.shape == (224, 224, 3) and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_any_input_size_keeps_crop_fraction():
    prep = Preprocessing(224, 0.875).with_input_size(160)
    assert prep.resize_size == 182
    image = Image.new("RGB", (500, 300), (10, 20, 30))
    assert eval_transform(image, prep).shape == (160, 160, 3)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    image = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode)
    path = tmp_path / f"img_{mode.replace(';', '')}.png" if mode != "CMYK" else tmp_path / "img.jpg"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (40, 30)


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 20), color) for color in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    pixel = np.asarray(load_image(path))[10, 10]
    assert pixel[0] > 200 and pixel[2] < 50


def test_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        load_image(path)


def test_shared_placeholder_gif_reads(data_dir):
    gif = data_dir / "hymenoptera_data" / "train" / "ants" / "imageNotFound.gif"
    assert eval_transform(gif, Preprocessing()).shape == (224, 224, 3)


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="interpolation"):
        Preprocessing(interpolation="lanczos9")
    with pytest.raises(ValueError, match="crop_fraction"):
        Preprocessing(crop_fraction=1.5)
