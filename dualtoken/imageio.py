"""Robust image input: one entry point, ``load_image``, that turns whatever a user hands in into an RGB PIL image.

The tokenizer, the data loaders and the app all read images through here, so every way an image can be bad
(missing, not an image, truncated, empty, a decompression bomb) surfaces as one ``ImageInputError`` whose message
names the problem and the file, instead of a PIL traceback or an out-of-memory kill.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dualtoken.errors import ImageInputError

# Largest width*height we agree to decode: a 40-megapixel photo is ~120 MB as RGB uint8. Checked from the header,
# before decoding, so a tiny file claiming 100000x100000 pixels is refused without allocating anything.
MAX_PIXELS = 40_000_000

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, np.ndarray, Image.Image]

_WHITE = (255, 255, 255)
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Return ``source`` as a new RGB PIL image.

    ``source`` may be a path, encoded bytes, a binary file object, a numpy array (HxW, HxWx1/3/4; uint8, uint16,
    bool, or float in [0, 1]) or a PIL image. Animated files give their first frame; EXIF orientation is applied;
    transparency is composited over white (see ``to_rgb``). Raises ``ImageInputError`` for anything unusable.
    """
    if isinstance(source, Image.Image):
        _check_size(source.size, "PIL image", max_pixels)
        try:  # a lazily opened file is decoded only now; a truncated one fails here, not deep in a conversion
            source.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageInputError(f"PIL image: corrupt or truncated data ({exc})") from exc
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            problem = "is a directory, not an image file" if path.is_dir() else "does not exist"
            raise ImageInputError(f"{path}: {problem}")
        return _decode(path, str(path), max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(source)), f"<{len(source)} bytes>", max_pixels)
    if hasattr(source, "read"):
        return _decode(source, str(getattr(source, "name", "<file object>")), max_pixels)
    raise ImageInputError(
        f"cannot load an image from a {type(source).__name__}: "
        "expected a path, bytes, a file object, a numpy array or a PIL image"
    )


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to a new RGB image.

    Transparency (alpha bands, premultiplied alpha, palette or single-colour transparency) is composited over
    white. High-depth modes are rescaled rather than clipped: I;16* by the 16-bit maximum 65535; I (32-bit int)
    as-is when within 0..255, by 65535 when within 0..65535, else by its min/max; F (float) by 255 when within
    [0, 1], else by its min/max. Every other mode (1, L, P, CMYK, YCbCr, LAB, HSV, ...) uses PIL's conversion.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(img)
    if mode in _ALPHA_MODES or "transparency" in img.info:
        # La and RGBa hold premultiplied colour; converting through LA / RGBA un-premultiplies it first.
        rgba = img.convert("LA").convert("RGBA") if mode == "La" else img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, _WHITE + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageInputError(f"cannot convert PIL mode {mode!r} to RGB: {exc}") from exc


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    values = np.asarray(img).astype(np.float64)  # I;16B arrives big-endian; astype makes it native
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and 255 < hi <= 65535):
        scaled = values * (255.0 / 65535.0)
    elif img.mode == "I" and lo >= 0 and hi <= 255:
        scaled = values
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        scaled = values * 255.0
    elif hi > lo:
        scaled = (values - lo) * (255.0 / (hi - lo))
    else:  # constant image outside the ranges above: nothing to stretch, keep the value where it is readable
        scaled = np.clip(values, 0, 255)
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageInputError(f"{name}: image is empty ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise ImageInputError(
            f"{name}: image is too large ({width}x{height} = {width * height:,} pixels, limit {max_pixels:,}); "
            "refusing to decode it (possible decompression bomb)"
        )


def _decode(fp, name: str, max_pixels: int) -> Image.Image:
    # PIL only warns between its own limit and twice that; make the warning an error so nothing slips through.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageInputError(f"{name}: image is too large, refusing to decode it ({exc})") from exc
        except UnidentifiedImageError as exc:
            raise ImageInputError(f"{name}: not an image file (or an unsupported format)") from exc
        except Exception as exc:  # a broken header can raise nearly anything inside a PIL plugin
            raise ImageInputError(f"{name}: cannot read the image header ({type(exc).__name__}: {exc})") from exc
        with img:
            _check_size(img.size, name, max_pixels)
            try:
                img.seek(0)  # animated GIF/PNG/WebP: the first frame
                img.load()
            except Exception as exc:
                raise ImageInputError(
                    f"{name}: corrupt or truncated {img.format or 'image'} data ({type(exc).__name__}: {exc})"
                ) from exc
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception:  # a broken EXIF block should not cost the user a readable image
                oriented = img
            return to_rgb(oriented)


def _from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageInputError(
            f"numpy image must be HxW, HxWx1, HxWx3 or HxWx4 (channels last), got shape {tuple(array.shape)}"
        )
    _check_size((array.shape[1], array.shape[0]), "numpy image", max_pixels)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.rint(array * (255.0 / 65535.0)).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageInputError("numpy float image contains NaN or infinite values")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0 or hi > 1:
            raise ImageInputError(f"numpy float image must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
        array = np.rint(array * 255.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi > 255:
            raise ImageInputError(
                f"numpy {array.dtype} image must lie in 0..255 (or be uint16), got values in [{lo}, {hi}]"
            )
        array = array.astype(np.uint8)
    else:
        raise ImageInputError(f"unsupported numpy image dtype {array.dtype}")
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))
