"""Injected faults (docs/reliability.md) for training/sampling/generate_images.py: a full disk under the PNG
writers, a guide network of another architecture.

Kept apart from tests/test_generate_images.py, which holds this module's other tests."""

import numpy as np
import pytest
import torch

from tests import faults
from training.sampling import generate_images as sampling
from training.snapshots.loading import load_snapshot


@pytest.mark.reliability
def test_generated_png_full_disk(tmp_path, full_disk):
    path = str(tmp_path / '000000.png')
    image = np.full([8, 8, 3], 200, np.uint8)
    faults.check_previous_kept(path, lambda: sampling.save_png(image, path), full_disk)


@pytest.mark.reliability
def test_image_grid_full_disk(tmp_path, full_disk):
    path = str(tmp_path / 'grid.png')
    images = torch.zeros([4, 3, 8, 8], dtype=torch.uint8)
    faults.check_previous_kept(path, lambda: sampling.save_image_grid(images, path), full_disk)


@pytest.mark.reliability
def test_guide_with_other_architecture_is_refused(tmp_path):
    files = faults.write_bad_pickles(tmp_path)
    net, gnet = load_snapshot(files['good'], '--net').ema, load_snapshot(files['other_res'], '--gnet').ema
    with pytest.raises(ValueError, match='^--gnet does not match --net: img_resolution 8 != 16$'):
        sampling.check_guide_compatible(net, gnet)
