import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from dualtoken.errors import ImageInputError
from dualtoken.imageio import MAX_PIXELS, load_image, to_rgb


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose data is a few bytes: a decompression-bomb stand-in."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _rgb(img: Image.Image) -> np.ndarray:
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out)


# --- to_rgb: every PIL mode -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"])
def test_to_rgb_plain_modes_round_trip_a_colour(mode):
    colour = (200, 30, 40) if mode not in ("1", "L") else (255, 255, 255)
    src = Image.new("RGB", (6, 4), colour)
    converted = src.convert(mode) if mode != "P" else src.convert("P", palette=Image.Palette.ADAPTIVE)
    out = _rgb(converted)
    assert np.abs(out.astype(int) - np.array(colour)).max() <= 6


@pytest.mark.parametrize("mode", ["LA", "La", "PA", "RGBA", "RGBa"])
def test_to_rgb_composites_alpha_over_white(mode):
    # Three pixels: opaque black, half-transparent black, fully transparent (hidden colour black).
    alpha = [255, 128, 0]
    if mode in ("RGBA", "RGBa"):
        img = Image.frombytes(mode, (3, 1), bytes(v for a in alpha for v in (0, 0, 0, a)))
    else:
        img = Image.frombytes(mode, (3, 1), bytes(v for a in alpha for v in (0, a)))
        if mode == "PA":
            img.putpalette([0, 0, 0] * 256)
    out = _rgb(img)
    assert (out[0, 0] <= 2).all()  # opaque black stays black
    assert 110 <= out[0, 1, 0] <= 145  # half-transparent black -> mid gray
    assert (out[0, 2] == 255).all()  # fully transparent -> white, whatever the hidden colour


def test_to_rgb_palette_with_transparency_index():
    img = Image.new("P", (3, 1))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    img.putdata([0, 1, 2])
    img.info["transparency"] = 0
    out = _rgb(img)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [255, 0, 0] and out[0, 2].tolist() == [0, 0, 255]


@pytest.mark.parametrize("mode, dtype", [("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2")])
def test_to_rgb_16bit_scales_by_65535(mode, dtype):
    values = np.array([[0, 32768, 65535]], dtype=dtype)
    img = Image.frombytes(mode, (3, 1), values.tobytes())
    assert _rgb(img)[0, :, 0].tolist() == [0, 128, 255]


def test_to_rgb_int32_uses_its_range():
    small = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    assert small.mode == "I" and _rgb(small)[0, :, 0].tolist() == [0, 100, 255]
    sixteen = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert _rgb(sixteen)[0, :, 0].tolist() == [0, 255]
    wide = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))
    assert _rgb(wide)[0, :, 0].tolist() == [0, 128, 255]


def test_to_rgb_float_unit_range_and_min_max():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F" and _rgb(unit)[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-3.0, 1.0, 5.0]], dtype=np.float32))
    assert _rgb(wide)[0, :, 0].tolist() == [0, 128, 255]
    nan = Image.fromarray(np.array([[np.nan, 0.5]], dtype=np.float32))
    assert _rgb(nan)[0, :, 0].tolist() == [0, 128]


# --- load_image: sources ----------------------------------------------------------------------------------------


def test_load_image_from_path_bytes_file_and_pil(tmp_path):
    src = Image.new("RGB", (7, 5), (10, 200, 30))
    path = tmp_path / "x.png"
    src.save(path)
    data = path.read_bytes()
    for source in (path, str(path), data, bytearray(data), io.BytesIO(data), src, src.convert("L")):
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (7, 5)
    assert np.asarray(load_image(path))[0, 0].tolist() == [10, 200, 30]
    with open(path, "rb") as f:
        assert load_image(f).size == (7, 5)


def test_load_image_returns_a_copy_of_pil_input():
    src = Image.new("RGB", (2, 2), (1, 2, 3))
    out = load_image(src)
    out.putpixel((0, 0), (9, 9, 9))
    assert src.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((3, 4), 128, np.uint8), [128, 128, 128]),
        (np.full((3, 4, 1), 7, np.uint8), [7, 7, 7]),
        (np.tile(np.array([255, 0, 0], np.uint8), (3, 4, 1)), [255, 0, 0]),
        (np.tile(np.array([0, 0, 0, 0], np.uint8), (3, 4, 1)), [255, 255, 255]),
        (np.full((3, 4, 3), 0.5, np.float32), [128, 128, 128]),
        (np.ones((3, 4), bool), [255, 255, 255]),
        (np.full((3, 4), 65535, np.uint16), [255, 255, 255]),
        (np.full((3, 4, 3), 9, np.int64), [9, 9, 9]),
    ],
)
def test_load_image_numpy(array, expected):
    out = load_image(array)
    assert out.size == (4, 3) and np.asarray(out)[1, 2].tolist() == expected


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((3, 4, 2), np.uint8), "shape"),
        (np.zeros((2, 3, 4, 3), np.uint8), "shape"),
        (np.full((3, 4), 2.0, np.float32), r"\[0, 1\]"),
        (np.full((3, 4), np.nan, np.float32), "NaN"),
        (np.full((3, 4), 300, np.int32), "0..255"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((3, 4), np.complex64), "dtype"),
    ],
)
def test_load_image_rejects_bad_arrays(array, message):
    with pytest.raises(ImageInputError, match=message):
        load_image(array)


def test_load_image_rejects_unknown_source_type():
    with pytest.raises(ImageInputError, match="int"):
        load_image(3)


# --- load_image: bad files --------------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageInputError, match="does not exist") as info:
        load_image(tmp_path / "nope.png")
    assert "nope.png" in str(info.value)
    with pytest.raises(ImageInputError, match="directory"):
        load_image(tmp_path)


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, I am not a JPEG\n")
    with pytest.raises(ImageInputError, match="not an image") as info:
        load_image(path)
    assert "notes.jpg" in str(info.value)
    with pytest.raises(ImageInputError, match="not an image"):
        load_image(b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(tmp_path, fmt):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = _encode(noise, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageInputError, match="corrupt or truncated") as info:
        load_image(path)
    assert path.name in str(info.value)
    with pytest.raises(ImageInputError):
        load_image(data[:40])
    lazy = Image.open(path)  # opened lazily: the cut shows only when the pixels are decoded
    with pytest.raises(ImageInputError, match="corrupt or truncated"):
        load_image(lazy)


def test_zero_sized_image():
    with pytest.raises(ImageInputError, match="empty|not an image"):  # PIL itself refuses a 0x0 PNG header
        load_image(_png_claiming(0, 0))
    with pytest.raises(ImageInputError, match="empty"):
        load_image(Image.new("RGB", (0, 0)))


def test_decompression_bomb_headers_are_refused_before_decoding():
    # Far beyond PIL's own limit: PIL's DecompressionBombError becomes our error.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no DecompressionBombWarning leaks out
        with pytest.raises(ImageInputError, match="too large"):
            load_image(_png_claiming(100_000, 100_000))
        # Below PIL's limit but above ours: our header check, without decoding (the data would not decode anyway).
        with pytest.raises(ImageInputError, match="too large.*limit"):
            load_image(_png_claiming(8_000, 8_000))
    assert 8_000 * 8_000 > MAX_PIXELS
    with pytest.raises(ImageInputError, match="too large"):
        load_image(Image.new("L", (20, 20)), max_pixels=100)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert np.asarray(load_image(data))[4, 4].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (6, 3), (0, 0, 0))
    img.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    out = load_image(_encode(img, "PNG", exif=exif))
    assert out.size == (3, 6)
    assert np.asarray(out)[0, 2].tolist() == [255, 255, 255]
