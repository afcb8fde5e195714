"""Preprocessing against torchvision's transforms, and real-world images: every mode and format, high bit depths
kept, over-large images refused."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps
from torchvision import transforms

from jaxtl.core.errors import ConfigError, ImageReadError
from jaxtl.core.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from jaxtl.data.images import load_image, open_image, verify_image
from jaxtl.data.preprocess import eval_pixels, eval_transform


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
    with pytest.raises(ConfigError, match="interpolation"):
        Preprocessing(interpolation="lanczos9")
    with pytest.raises(ConfigError, match="crop_fraction"):
        Preprocessing(crop_fraction=1.5)


def bomb_png(path, side=40_000):
    """A PNG whose header says side x side pixels (1.6 gigapixels by default) in a few hundred bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100_000, 9))
                     + chunk(b"IEND", b""))
    return path


def test_sixteen_bit_gradient_keeps_its_gradient(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I;16")
    pixels = np.asarray(load_image(tmp_path / "ramp16.png"))
    assert pixels.shape == (4, 256, 3)
    np.testing.assert_array_equal(pixels[0, :, 0], np.round(ramp[0] / 257).astype(np.uint8))  # 0..255, not 255s
    assert len(np.unique(pixels)) == 256


@pytest.mark.parametrize("mode,values,expected", [
    ("I", np.array([-(2**31), 0, 2**31 - 1]), [0, 128, 255]),  # 32-bit integers over their whole range
    ("F", np.array([0.0, 0.5, 1.0, 7.0]), [0, 128, 255, 255]),  # floats over [0, 1]
])
def test_high_bit_depth_modes_map_over_their_range(tmp_path, mode, values, expected):
    array = np.tile(values.astype(np.int32 if mode == "I" else np.float32), (2, 1))
    Image.fromarray(array, mode).save(tmp_path / "deep.tif")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "deep.tif"))[0, :, 1], expected)


def test_decompression_bomb_is_refused_naming_the_file_and_the_limit(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 1000
    for check in (load_image, verify_image):
        with pytest.raises(ImageReadError, match=r"'.*bomb.png' is 40000x40000 = 1,600,000,000 pixels, more than "
                                                 r"data.max_image_pixels=178,956,970"):
            check(bomb)
    Image.new("RGB", (100, 80)).save(tmp_path / "small.png")
    with pytest.raises(ImageReadError, match=r"small.png' is 100x80 = 8,000 pixels, more than data.max_image_pixels=5,000"):
        load_image(tmp_path / "small.png", max_pixels=5000)
    assert load_image(tmp_path / "small.png", max_pixels=8000).size == (100, 80)
    # a limit above PIL's own (about 179 megapixels) is this limit's to decide
    with open_image(bomb, max_pixels=2_000_000_000) as image:
        assert image.size == (40_000, 40_000)


@pytest.mark.parametrize("name,mode,size", [
    ("cmyk.jpg", "CMYK", (40, 30)), ("rgba.png", "RGBA", (40, 30)), ("palette.png", "P", (40, 30)),
    ("still.gif", "P", (40, 30)), ("lossy.webp", "RGB", (40, 30)), ("plain.bmp", "RGB", (40, 30)),
    ("scan.tiff", "RGB", (40, 30)), ("gray.png", "L", (40, 30)), ("one.png", "RGB", (1, 1)),
    ("strip.png", "RGB", (4000, 3)), ("страница_ß.jpg", "RGB", (40, 30)),
])
def test_formats_modes_and_odd_shapes_load_as_rgb(tmp_path, name, mode, size):
    colour = Image.new("RGB", size, (200, 100, 50))
    colour.convert(mode).save(tmp_path / name)
    verify_image(tmp_path / name)
    image = load_image(tmp_path / name)
    assert image.mode == "RGB" and image.size == size
    if mode not in ("L", "P"):
        assert np.abs(np.asarray(image, np.int32) - (200, 100, 50)).max() <= 12  # lossy formats within a few levels
    assert eval_transform(tmp_path / name, Preprocessing(input_size=32)).shape == (32, 32, 3)


@pytest.mark.parametrize("name,content", [
    ("zero.jpg", b""), ("text.jpg", b"hello, I am a text file"), ("truncated.jpg", None),
])
def test_broken_files_name_the_file(tmp_path, name, content):
    if content is None:  # the first half of a real JPEG
        _photo(tmp_path)
        data = (tmp_path / "photo.jpg").read_bytes()
        content = data[: len(data) // 2]
    (tmp_path / name).write_bytes(content)
    for check in (verify_image, load_image):
        with pytest.raises(ImageReadError, match=f"cannot read image '.*{name}'"):
            check(tmp_path / name)


def _sideways_photo(path, orientation=6):
    """A JPEG stored rotated, as a phone stores a portrait photo, with the EXIF tag saying how to turn it: upright
    it is 40 wide and 60 tall, red on top, blue at the bottom."""
    upright = np.zeros((60, 40, 3), np.uint8)
    upright[:30] = (220, 20, 20)
    upright[30:] = (20, 20, 220)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # tag 6 undoes a 90° turn this way
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, quality=95, exif=exif.tobytes())
    return path


def test_exif_orientation_is_applied_by_default_everywhere_and_can_be_switched_off(tmp_path):
    from jaxtl.data.decoded import decoded_split
    from jaxtl.data.folder import folder_dataset
    from jaxtl.data.pipeline import batches

    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        _sideways_photo(tmp_path / "data" / cls / "photo.jpg")
    assert Image.open(tmp_path / "data" / "a" / "photo.jpg").size == (60, 40)  # stored sideways

    def is_upright(pixels):
        pixels = np.asarray(pixels, np.float32)
        top, bottom = pixels[: len(pixels) // 4].mean((0, 1)), pixels[-len(pixels) // 4 :].mean((0, 1))
        return top[0] > 150 and bottom[2] > 150

    prep = Preprocessing(32, 1.0)
    assert load_image(tmp_path / "data" / "a" / "photo.jpg").size == (40, 60)
    assert is_upright(eval_pixels(tmp_path / "data" / "a" / "photo.jpg", prep))
    split = folder_dataset(tmp_path / "data", val_fraction=0.0).splits["train"]
    assert split.load(0, 64).size == (40, 60)
    batch = next(iter(batches(split, prep, 2, train=False)))
    assert is_upright(batch["images"][0])
    assert is_upright(decoded_split(split, prep, tmp_path / "cache").pixels(0))

    off = folder_dataset(tmp_path / "data", val_fraction=0.0, exif=False).splits["train"]
    assert off.load(0, 64).size == (60, 40) and load_image(off.files[0], exif=False).size == (60, 40)
    assert not is_upright(next(iter(batches(off, prep, 2, train=False)))["images"][0])
    assert decoded_split(off, prep, tmp_path / "cache").directory != decoded_split(split, prep, tmp_path / "cache").directory


def test_predict_turns_photos_upright_unless_told_not_to(tmp_path, capsys):
    import json

    from jaxtl.cli import main

    photo = _sideways_photo(tmp_path / "photo.jpg")
    upright = tmp_path / "upright.png"
    Image.open(photo).transpose(Image.Transpose.ROTATE_270).save(upright)
    main(["predict", "--model", "efficientnet_lite0", "--json", "--top", "3", str(photo), str(upright)])
    tagged, plain = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert [t["index"] for t in tagged["top"]] == [t["index"] for t in plain["top"]]
    assert tagged["top"][0]["prob"] == pytest.approx(plain["top"][0]["prob"], abs=0.05)
    main(["predict", "--model", "efficientnet_lite0", "--json", "--top", "3", "--ignore-exif", str(photo)])
    ignored = json.loads(capsys.readouterr().out)
    assert ignored["top"][0]["prob"] != pytest.approx(tagged["top"][0]["prob"], abs=1e-4)


@pytest.mark.parametrize("turn", [1, 3, 6, 8])
@pytest.mark.parametrize("factor", [1, 2, 4])
def test_training_decode_gives_pils_pixels_upright_and_scaled(tmp_path, turn, factor):
    """libjpeg-turbo from bytes (the training crops' decode) gives exactly what PIL's decode (draft scale, EXIF
    transpose) gives: training and evaluation see the same pixels."""
    from jaxtl.data.images import decode_jpeg_fast

    rng = np.random.default_rng(turn * 10 + factor)
    pixels = np.clip(rng.normal(128, 60, (96, 144, 3)).cumsum(1) / 8, 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = turn
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels).save(path, quality=90, exif=exif.tobytes())
    with Image.open(path) as image:
        image.draft("RGB", (-(-144 // factor), -(-96 // factor)))
        expected = np.asarray(ImageOps.exif_transpose(image.convert("RGB")))
    got = np.asarray(decode_jpeg_fast(path.read_bytes(), factor, turn))
    np.testing.assert_array_equal(got, expected)


def test_training_crop_reads_a_jpeg_once_without_pil_and_decodes_as_pil_does(tmp_path, monkeypatch):
    """A training crop's JPEG (`Split.load` with `scale`) is read once and decoded by libjpeg-turbo from its bytes,
    PIL not opened unless the file has an APP1 segment (EXIF, XMP: where PIL finds the orientation); every kind of
    file gives exactly what PIL's decode at that DCT scale, turned upright, gives; `scale` sees the upright size
    once; a file over the pixel limit or damaged is an error naming it."""
    import PIL.Image

    from jaxtl.data.split import Split

    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(128, 60, (96, 144, 3)).cumsum(1) / 8, 0, 255).astype(np.uint8)
    photo = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">' \
          b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="8"/></rdf:RDF></x:xmpmeta>'
    files = {"plain.jpg": dict(quality=90), "exif.jpg": dict(exif=exif.tobytes()), "xmp.jpeg": dict(xmp=xmp),
             "progressive.jpg": dict(progressive=True), "rgb444.jpg": dict(subsampling=0)}
    for name, options in files.items():
        photo.save(tmp_path / name, **options)
    photo.convert("L").save(tmp_path / "grey.jpg")
    photo.convert("CMYK").save(tmp_path / "cmyk.jpg")
    photo.save(tmp_path / "png_inside.jpg", format="PNG")
    names = [*files, "grey.jpg", "cmyk.jpg", "png_inside.jpg"]
    split = Split(tuple(tmp_path / n for n in names), np.zeros(len(names), np.int32))
    for factor in (1, 2):
        for index, name in enumerate(names):
            with Image.open(tmp_path / name) as image:
                if image.format == "JPEG":
                    image.draft("RGB", (-(-144 // factor), -(-96 // factor)))
                expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
            asked = []
            got = split.load(index, scale=lambda w, h: asked.append((w, h)) or factor)
            np.testing.assert_array_equal(np.asarray(got), expected, err_msg=name)
            upright = (96, 144) if name in ("exif.jpg", "xmp.jpeg") else (144, 96)
            assert asked == ([] if name == "png_inside.jpg" else [upright]), name

    def no_pil(*args, **kwargs):
        raise AssertionError("PIL opened the file")

    monkeypatch.setattr(PIL.Image, "open", no_pil)
    assert split.load(names.index("plain.jpg"), scale=lambda w, h: 1).size == (144, 96)
    assert split.load(names.index("grey.jpg"), scale=lambda w, h: 2).size == (72, 48)
    monkeypatch.undo()

    small = Split(split.files, split.labels, max_pixels=10_000)
    with pytest.raises(ImageReadError, match=r"plain.jpg' is 144x96 = 13,824 pixels, more than data.max_image_pixels"):
        small.load(0, scale=lambda w, h: 1)
    data = (tmp_path / "plain.jpg").read_bytes()
    (tmp_path / "plain.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cannot read image '.*plain.jpg'"):
        split.load(0, scale=lambda w, h: 1)
