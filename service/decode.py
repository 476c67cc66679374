"""Decode uploaded bytes into an RGB ``uint8`` array: step one of the request path.

Every format users bring ends here as ``(H, W, 3) uint8`` so that the rest of the path has one
input type. Training reads its PNGs through the same function, so the service decodes images
exactly as the model saw them.

Errors are typed (:class:`DecodeError` -> HTTP 415/422, :class:`TooLargeError` -> HTTP 413) and
raised *before* any large allocation: the declared size is checked against ``max_pixels`` from
the file header, so a decompression bomb costs nothing.

Channels and pages: gray, RGB and RGBA are read as they are. Anything with other channels
(a Fiji hyperstack ``CYX``, an OME-TIFF, 2 or 5 channels last) or several pages (multi-page
TIFF, animated GIF) needs ``channel`` (0-based) to say which plane holds the nuclei: guessing
would segment the wrong one and still answer 200. A z-stack or time series is refused: the
model is 2D.
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


#: What a TIFF read whole (all its channels) may hold, per pixel of ``max_pixels``: 8 bytes (a float64
#: gray image, or RGB(A) of 16 bits); a plane chosen from a multi-page file is read alone.
MAX_BYTES_PER_PIXEL = 8


def decode_image(data: bytes, max_pixels: int = 50_000_000, channel: int | None = None) -> np.ndarray:
    """Decode image bytes (PNG, JPEG, TIFF, BMP, GIF, WebP) into an ``(H, W, 3) uint8`` RGB array.

    ``channel`` picks the nuclear channel (or page) of a multi-channel or multi-page image; the
    chosen plane is returned as gray. 16-bit and float data are rescaled to 8 bits between
    robust percentiles; NaN and inf become the minimum.
    """
    if not data:
        raise DecodeError("empty upload: the file has no bytes")
    if channel is not None and channel < 0:
        raise DecodeError(f"channel must be >= 0, got {channel}")
    if data[:4] in TIFF_MAGIC:
        array = _decode_tiff(data, max_pixels, channel)
    else:
        array = _decode_pil(data, max_pixels, channel)
    return to_rgb_uint8(array)


def _choose(count: int, what: str, axes: str, channel: int | None) -> int:
    """The plane ``channel`` of ``count`` (validated), or the error that asks for it."""
    if channel is None:
        choices = "channel=0 or channel=1" if count == 2 else f"one of channel=0 to channel={count - 1}"
        raise DecodeError(f"{count} {what} ({axes}); pass {choices} to choose the one with the nuclei")
    if channel >= count:
        raise DecodeError(f"channel={channel}, but the image has {count} {what} ({axes}): 0 to {count - 1}")
    return channel


def _one_plane(array: np.ndarray, channel: int | None) -> np.ndarray:
    """A single-plane image: any ``channel`` but 0 names a plane that is not there."""
    if channel not in (None, 0):
        raise DecodeError(f"channel={channel}, but the image has one channel (pass channel=0 or none)")
    return array


def _check_pixels(height: int, width: int, max_pixels: int) -> None:
    if height < 1 or width < 1:
        raise DecodeError(f"image has no pixels ({width}x{height})")
    if height * width > max_pixels:
        raise TooLargeError(
            f"image is {width}x{height} = {height * width} pixels, over the limit of {max_pixels}"
        )


def _decode_pil(data: bytes, max_pixels: int, channel: int | None) -> np.ndarray:
    """A Pillow-readable file's pixels; several frames need ``channel`` to pick one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in PIL_FORMATS:
                raise DecodeError(f"unsupported image format {image.format}", unsupported_type=True)
            _check_pixels(image.height, image.width, max_pixels)
            frames = 1 if image.format == "MPO" else getattr(image, "n_frames", 1)  # MPO: a phone's JPEG and its previews
            if frames > 1:
                image.seek(_choose(frames, "pages (frames)", "IYX", channel))
                channel = None  # the page was the choice; its pixels are read as they are
                frame = image
            else:
                frame = next(ImageSequence.Iterator(image))
            frame.load()
            return _select_channel(_pil_to_array(frame), channel)
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


def _select_channel(array: np.ndarray, channel: int | None) -> np.ndarray:
    """A channels-last array as it is (gray, RGB, RGBA), or its plane ``channel`` as gray."""
    if array.ndim == 2:
        return _one_plane(array, channel)
    if channel is None and array.shape[-1] in (1, 3, 4):
        return array
    return array[..., _choose(array.shape[-1], "channels", "YXC", channel)]


def _decode_tiff(data: bytes, max_pixels: int, channel: int | None) -> np.ndarray:
    """The pixels of a TIFF (ImageJ hyperstack and OME-TIFF included), read through its
    series' axes so that channels, pages, z-slices and time points are told apart."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if not tif.pages:
                raise DecodeError("TIFF has no pages")
            series = _images(tif.series)
            if len(series) > 1:  # separate images in one file (pages of different shapes)
                chosen = series[_choose(len(series), "images (TIFF series)", "IYX", channel)]
                channel = None
            else:
                chosen = series[0]
            axes, shape = _plane_axes(chosen.axes, tuple(int(n) for n in chosen.shape))
            height, width = shape[axes.index("Y")], shape[axes.index("X")]
            _check_pixels(height, width, max_pixels)
            other = next((a for a in axes if a not in "YX"), None)
            if other not in (None, "S") and len(chosen.pages) == shape[axes.index(other)] > 1:
                # one plane per page (hyperstacks, OME-TIFF, multi-page): read the chosen page only
                page = chosen.pages[_choose(len(chosen.pages), _planes(other), axes, channel)]
                return np.asarray(page.asarray()).reshape(height, width)
            itemsize = np.dtype(chosen.dtype).itemsize
            if int(np.prod(shape)) * itemsize > MAX_BYTES_PER_PIXEL * max_pixels:
                raise TooLargeError(f"TIFF holds {int(np.prod(shape)) * itemsize} bytes of pixels ({axes} {shape}, "
                                    f"{chosen.dtype}), over {MAX_BYTES_PER_PIXEL} bytes per pixel of the "
                                    f"{max_pixels}-pixel limit")
            array = np.asarray(chosen.asarray()).reshape(shape)
    except (DecodeError, TooLargeError):
        raise
    except Exception as exc:  # tifffile raises many types on corrupt data
        raise DecodeError(f"corrupt or unsupported TIFF: {exc}") from None
    return _tiff_plane(array, axes, channel)


def _images(series: list) -> list:
    """A TIFF's images, less its previews: reduced-resolution pages, and series a quarter or less of
    the largest one's pixels (a scanner's thumbnail or label image beside the scan)."""
    full = [s for s in series if not getattr(s.keyframe, "is_reduced", False)] or list(series)

    def pixels(s) -> int:
        shape = dict(zip(s.axes, s.shape))
        return int(shape.get("Y", 1)) * int(shape.get("X", 1))

    largest = max(pixels(s) for s in full)
    if len(full) > 1 and sum(pixels(s) * 4 > largest for s in full) == 1:
        return [max(full, key=pixels)]
    return full


def _plane_axes(axes: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """The series' axes without its length-1 ones; a z-stack, a time series or a layout with more
    than one axis besides Y and X is refused here, before any pixel is read."""
    if "Y" not in axes or "X" not in axes:
        raise DecodeError(f"unsupported TIFF layout {axes} {shape}; expected a 2D image (Y and X axes)")
    kept = [(a, n) for a, n in zip(axes, shape) if n > 1 or a in "YX"]
    sizes = dict(kept)
    if sizes.get("Z", 1) > 1:
        raise DecodeError(f"a z-stack of {sizes['Z']} slices ({axes} {shape}); this is a 2D model: project "
                          "it (e.g. a maximum-intensity projection in Fiji) or save one slice")
    if sizes.get("T", 1) > 1:
        raise DecodeError(f"a time series of {sizes['T']} frames ({axes} {shape}); this is a 2D model: "
                          "send one frame at a time")
    if len(kept) > 3:
        raise DecodeError(f"unsupported TIFF layout {axes} {shape}; expected one channel or page axis")
    return "".join(a for a, _ in kept), tuple(n for _, n in kept)


def _planes(axis: str) -> str:
    """What the planes along a TIFF axis are called in messages."""
    return "channels" if axis in "CS" else "pages"


def _tiff_plane(array: np.ndarray, axes: str, channel: int | None) -> np.ndarray:
    """The 2D image of a squeezed TIFF series (at most one axis besides Y and X): samples of
    RGB(A) kept, any other axis chosen by ``channel``."""
    other = next((a for a in axes if a not in "YX"), None)
    array = np.moveaxis(array, [axes.index("Y"), axes.index("X")], [0, 1])
    if other is None:
        return _one_plane(array, channel)
    count = array.shape[-1]
    if other == "S" and count in (3, 4) and channel is None:
        return array  # RGB or RGBA samples
    return array[..., _choose(count, _planes(other), axes, channel)]


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
