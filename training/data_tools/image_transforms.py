"""Image scale/crop transforms of `dataset_tool.py convert` and of the fork's `CenterCropImagenet`.

Every transform takes and returns an HWC uint8 numpy array (RGB). All resizes are PIL resizes of uint8
images, as in the official dataset_tool.py. A transform returns None when the image must be skipped
(only `center-crop-wide` does this, for images too small to fill the output).
"""

from typing import Optional

import numpy as np
import PIL.Image

TRANSFORM_MODES = ('center-crop', 'center-crop-wide', 'center-crop-dhariwal')

#----------------------------------------------------------------------------


def _resize(img: np.ndarray, size: tuple, resample: int) -> np.ndarray:
    return np.array(PIL.Image.fromarray(img).resize(size, resample))


def scale_only(img: np.ndarray, width: Optional[int], height: Optional[int]) -> np.ndarray:
    """Transform "none": LANCZOS resize to (width or w, height or h) unless the size already matches."""
    h, w = img.shape[:2]
    if (w, h) == (width, height) or (width is None and height is None):
        return img
    return _resize(img, (width or w, height or h), PIL.Image.LANCZOS)


def center_crop(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Crop the centred square of side s = min(w, h), rows (h-s)//2 ... (h+s)//2, then LANCZOS resize."""
    h, w = img.shape[:2]
    s = min(w, h)
    img = img[(h - s) // 2:(h + s) // 2, (w - s) // 2:(w + s) // 2]
    return _resize(img, (width, height), PIL.Image.LANCZOS)


def center_crop_wide(img: np.ndarray, width: int, height: int) -> Optional[np.ndarray]:
    """Crop a full-width band of height round(W*h/w), resize to (W, H) and centre it on a black W x W canvas."""
    h, w = img.shape[:2]
    ch = int(np.round(width * h / w))
    if w < width or ch < height:
        return None
    img = img[(h - ch) // 2:(h + ch) // 2]
    img = _resize(img, (width, height), PIL.Image.LANCZOS)
    canvas = np.zeros([width, width, img.shape[2]], dtype=np.uint8)
    canvas[(width - height) // 2:(width + height) // 2] = img
    return canvas


def center_crop_dhariwal(img: np.ndarray, size: int) -> np.ndarray:
    """ADM recipe: BOX-halve while the short side >= 2*size, BICUBIC so the short side is `size`, centre crop."""
    pil = PIL.Image.fromarray(img)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=PIL.Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=PIL.Image.BICUBIC)
    arr = np.array(pil)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]

#----------------------------------------------------------------------------


class TransformWrapper:
    """Picklable transform (usable in DataLoader workers): `TransformWrapper(mode, width, height)(img)`."""

    def __init__(self, mode: Optional[str], width: Optional[int], height: Optional[int]):
        check_transform_args(mode, width, height)
        self.mode = mode
        self.width = width
        self.height = height

    def __call__(self, img: np.ndarray) -> Optional[np.ndarray]:
        if self.mode is None:
            return scale_only(img, self.width, self.height)
        if self.mode == 'center-crop':
            return center_crop(img, self.width, self.height)
        if self.mode == 'center-crop-wide':
            return center_crop_wide(img, self.width, self.height)
        return center_crop_dhariwal(img, self.width)


def check_transform_args(mode: Optional[str], width: Optional[int], height: Optional[int]) -> None:
    """The official checks (the fork dropped them: docs/differences.md#data-14), plus center-crop-wide's
    H <= W. Raises ValueError."""
    if mode is None:
        return
    if mode not in TRANSFORM_MODES:
        raise ValueError(f'unknown transform {mode!r}; expected one of {", ".join(TRANSFORM_MODES)}')
    if width is None or height is None:
        raise ValueError(f'must specify --resolution=WxH when using {mode} transform')
    if mode == 'center-crop-dhariwal' and width != height:
        raise ValueError('width and height must match in --resolution=WxH when using center-crop-dhariwal transform')
    if mode == 'center-crop-wide' and height > width:
        # The band is pasted into a W x W canvas, which cannot hold a taller one.
        raise ValueError('height must not exceed width in --resolution=WxH when using center-crop-wide transform')


def to_rgb_array(image: PIL.Image.Image) -> np.ndarray:
    """HWC uint8 RGB array of a PIL image of any mode (palette, grayscale, RGBA, ...)."""
    return np.array(image.convert('RGB'))

#----------------------------------------------------------------------------
