"""Decode uploaded bytes into an RGB ``uint8`` array: step one of the request path.

Every format users bring ends here as ``(H, W, 3) uint8`` so that the rest of the path has one
input type. Training reads its PNGs through the same function, so the service decodes images
exactly as the model saw them.

Errors are typed (:class:`DecodeError` -> HTTP 415/422, :class:`TooLargeError` -> HTTP 413) and
raised *before* any large allocation: the declared size is checked against ``max_pixels`` from
the file header, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

#: Formats decoded by Pillow (TIFF goes through tifffile for 16-bit, float and multi-channel data).
PIL_FORMATS = {"PNG", "JPEG", "MPO", "BMP", "GIF", "WEBP", "PPM"}  # MPO: phone JPEGs
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: Percentiles used to map 16-bit and float intensities to 8 bits (robust to hot pixels).
RESCALE_PERCENTILES = (0.1, 99.9)


class DecodeError(ValueError):
    """The bytes are not an image we can read (corrupt, truncated, unsupported layout)."""

    def __init__(self, message: str, unsupported_type: bool = False) -> None:
        super().__init__(message)
        #: True when the data is a recognised but unsupported kind of file (HTTP 415 rather than 422).
        self.unsupported_type = unsupported_type


class TooLargeError(ValueError):
    """The image declares more pixels than allowed (HTTP 413)."""


def decode_image(data: bytes, max_pixels: int = 50_000_000) -> np.ndarray:
    """Decode image bytes (PNG, JPEG, TIFF, BMP, GIF, WebP) into an ``(H, W, 3) uint8`` RGB array.

    Multi-frame files (animated GIF, multi-page TIFF) yield their first frame. 16-bit and float
    data are rescaled to 8 bits between robust percentiles; NaN and inf become the minimum.
    """
    if not data:
        raise DecodeError("empty upload: the file has no bytes")
    if data[:4] in TIFF_MAGIC:
        array = _decode_tiff(data, max_pixels)
    else:
        array = _decode_pil(data, max_pixels)
    return to_rgb_uint8(array)


def _check_pixels(height: int, width: int, max_pixels: int) -> None:
    if height < 1 or width < 1:
        raise DecodeError(f"image has no pixels ({width}x{height})")
    if height * width > max_pixels:
        raise TooLargeError(
            f"image is {width}x{height} = {height * width} pixels, over the limit of {max_pixels}"
        )


def _decode_pil(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in PIL_FORMATS:
                raise DecodeError(f"unsupported image format {image.format}", unsupported_type=True)
            _check_pixels(image.height, image.width, max_pixels)
            frame = next(ImageSequence.Iterator(image))
            frame.load()
            return _pil_to_array(frame)
    except (DecodeError, TooLargeError):
        raise
    except UnidentifiedImageError:
        raise DecodeError(
            "not a supported image (expected PNG, JPEG, TIFF, BMP, GIF or WebP)", unsupported_type=True
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooLargeError(f"image refused as a decompression bomb: {exc}") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... on corrupt data
        raise DecodeError(f"corrupt or truncated image: {exc}") from None


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """Pillow image -> array with the fewest conversions that keep information."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return np.asarray(image.convert("F") if mode != "F" else image, dtype=np.float32)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "1", "LA", "PA", "RGBX", "RGBa", "La"):
        image = image.convert("RGB" if mode != "LA" else "L")
    return np.asarray(image)


def _decode_tiff(data: bytes, max_pixels: int) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if not tif.pages:
                raise DecodeError("TIFF has no pages")
            page = tif.pages[0]
            shape = tuple(int(s) for s in page.shape)
            height, width = _tiff_height_width(shape)
            _check_pixels(height, width, max_pixels)
            array = page.asarray()
    except (DecodeError, TooLargeError):
        raise
    except Exception as exc:  # tifffile raises many types on corrupt data
        raise DecodeError(f"corrupt or unsupported TIFF: {exc}") from None
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 2, 3, 4) and array.shape[-1] not in (1, 2, 3, 4):
        array = np.moveaxis(array, 0, -1)  # planar (C, H, W) -> (H, W, C)
    return array


def _tiff_height_width(shape: tuple[int, ...]) -> tuple[int, int]:
    """(height, width) of a 2D page: (H, W), (H, W, S) or planar (S, H, W) with at most 4 samples.

    Anything else (volumes, hundreds of samples) is refused before its data is read, so the
    pixel limit cannot be dodged through extra dimensions.
    """
    if len(shape) == 2:
        return shape
    if len(shape) == 3 and shape[-1] <= 4:
        return shape[0], shape[1]
    if len(shape) == 3 and shape[0] <= 4:
        return shape[1], shape[2]
    raise DecodeError(f"unsupported TIFF layout with shape {shape}; expected a 2D image with at most 4 channels")


def to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """Any 2D or channel-last image array -> ``(H, W, 3) uint8``.

    Grayscale is repeated into three channels, alpha is dropped, 16-bit and float data are
    rescaled between percentiles; other channel counts (2, 5, ...) are refused because we cannot
    know which channel holds the nuclei.
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise DecodeError(f"unsupported image shape {array.shape}; expected (H, W) or (H, W, C)")
    channels = array.shape[-1]
    if channels == 4:
        array = array[..., :3]
    elif channels not in (1, 3):
        raise DecodeError(
            f"unsupported number of channels: {channels} (expected 1 gray, 3 RGB or 4 RGBA)"
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = rescale_to_uint8(array)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def rescale_to_uint8(array: np.ndarray, percentiles: tuple[float, float] = RESCALE_PERCENTILES) -> np.ndarray:
    """Map a high-bit-depth or float image to 8 bits between robust percentiles of its finite values."""
    values = np.asarray(array, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = np.percentile(values[finite], percentiles)
    if high <= low:
        high = low + 1.0
    values = np.where(finite, values, low)
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0
    return np.round(scaled).astype(np.uint8)
