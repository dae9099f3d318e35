"""Reading and decoding images into the fixed geometry a model expects.

Runs in CPU tasks ahead of the model actors. Grayscale, palette, CMYK and alpha
images are converted to RGB; anything PIL cannot decode raises ImageError, which
the job records and skips.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from semprobe.datasets import cifar
from semprobe.datasets.images import filesystem

_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
CROP_MODES = ("center", "squash", "border")  # timm's eval crop modes (timm.data.transforms_imagenet_eval)


class ImageError(Exception):
    """An image that cannot be read or decoded; ``stage`` says which."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


def read_bytes(uri: str) -> bytes:
    """The raw bytes at a local path or ``s3://`` / ``gs://`` URI."""
    try:
        if uri.startswith(cifar.PREFIX):
            return cifar.image_png(uri)
        fs, path = filesystem(uri)
        with fs.open_input_stream(path) as f:
            return f.read()
    except Exception as err:  # any filesystem failure is this image's failure, not the job's
        raise ImageError("read", f"{type(err).__name__}: {err}") from None


def decode_image(
    data: bytes,
    size: int,
    resize_size: int,
    interpolation: str = "bicubic",
    precropped: bool = False,
    crop_mode: str = "center",
    fill: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """Decode, resize the shorter side to ``resize_size``, centre-crop ``size`` x ``size``.

    ``precropped``: the image is already the model's ``size`` x ``size`` input
    (an adversarial example, say) and is taken as it is; any other size is an error.

    ``crop_mode``: timm's evaluation crops. ``center`` (torchvision's and timm's default) as above;
    ``squash``: both sides resized to ``resize_size`` (the aspect ratio is not kept), then the centre crop;
    ``border``: the longer side resized to ``resize_size`` (aspect kept), then centre-cropped or padded with
    ``fill`` (timm pads with the model's mean colour) to ``size`` x ``size``.

    Returns
    -------
    ndarray, (size, size, 3) uint8, RGB
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # PIL is lazy; a truncated file only fails here
            rgb = im.convert("RGB")
    except Exception as err:
        # PIL names the in-memory file by its address; drop it so reruns record the same message.
        raise ImageError(
            "decode", f"{type(err).__name__}: {re.sub(r' <[^>]* at 0x[0-9a-f]+>', '', str(err))}"
        ) from None
    w, h = rgb.size
    if precropped:
        if (w, h) != (size, size):
            raise ImageError("decode", f"a pre-cropped image must be {size}x{size}, got {w}x{h}")
        return np.asarray(rgb, dtype=np.uint8)
    if crop_mode == "squash":  # torchvision's Resize((s, s))
        new_w, new_h = resize_size, resize_size
    elif crop_mode == "border":  # timm's ResizeKeepRatio(longest=1): the longer side becomes resize_size
        ratio = max(w, h) / resize_size
        new_w, new_h = round(w / ratio), round(h / ratio)
    elif w <= h:  # torchvision's Resize(int): the shorter side becomes resize_size, the other is truncated
        new_w, new_h = resize_size, int(resize_size * h / w)
    else:
        new_w, new_h = int(resize_size * w / h), resize_size
    if (new_w, new_h) != (w, h):
        rgb = rgb.resize((new_w, new_h), _INTERPOLATION[interpolation])
    if crop_mode == "border" and (new_w < size or new_h < size):  # timm's CenterCropOrPad: pad, then crop
        padded = Image.new("RGB", (max(new_w, size), max(new_h, size)), tuple(fill))
        padded.paste(rgb, ((size - new_w) // 2 if new_w < size else 0, (size - new_h) // 2 if new_h < size else 0))
        rgb, (new_w, new_h) = padded, padded.size
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.asarray(rgb.crop((left, top, left + size, top + size)), dtype=np.uint8)
