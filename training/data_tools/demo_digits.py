"""A small real image dataset that needs no download: scikit-learn's 8x8 handwritten digits.

The demo exports it as a folder of grayscale PNGs with `dataset.json` labels, the layout that
`dataset_tool.py convert --source=FOLDER` reads; `convert` then upscales it to the training resolution.
"""

from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image

from torch_utils import misc

#----------------------------------------------------------------------------

def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """Return (images [N, 8, 8] uint8 in 0..255, labels [N] int64). scikit-learn ships the data."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError('The digits demo needs scikit-learn: pip install scikit-learn') from err
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8) # stored as 0..16
    return images, digits.target.astype(np.int64)

def export_digits(dest: str, max_images: int | None = None) -> int:
    """Write the digits as `dest/<class>/img<index>.png` plus `dest/dataset.json`; return the image count."""
    images, labels = load_digits_uint8()
    if max_images is not None:
        images, labels = images[:max_images], labels[:max_images]
    pairs = []
    for idx, (image, label) in enumerate(zip(images, labels)):
        fname = f'{label}/img{idx:05d}.png'
        os.makedirs(os.path.join(dest, str(label)), exist_ok=True)
        with misc.atomic_open(os.path.join(dest, fname), 'wb') as f:
            PIL.Image.fromarray(image, 'L').save(f, format='png')
        pairs.append([fname, int(label)])
    with misc.atomic_open(os.path.join(dest, 'dataset.json'), 'w') as f:
        json.dump({'labels': pairs}, f)
    return len(pairs)

#----------------------------------------------------------------------------

def digit_recognition_rate(images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of generated digits that a classifier trained on the real digits reads as the requested class.

    `images` is uint8 [N, C, H, W] (any resolution, C = 1 or 3), `labels` the requested classes [N]. An
    offline stand-in for a quality metric: the classifier is a logistic regression on the real 8x8 digits,
    which scores about 97% on held-out real digits.
    """
    from sklearn.linear_model import LogisticRegression
    real, real_labels = load_digits_uint8()
    classifier = LogisticRegression(max_iter=2000).fit(real.reshape(len(real), -1) / 255, real_labels)
    gray = images.astype(np.float32).mean(axis=1) # [N, H, W]
    small = np.stack([np.asarray(PIL.Image.fromarray(img).resize((8, 8), PIL.Image.BOX)) for img in gray])
    predicted = classifier.predict(small.reshape(len(small), -1) / 255)
    return float(np.mean(predicted == labels))

#----------------------------------------------------------------------------
