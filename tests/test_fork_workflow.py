"""The fork's second-stage workflow end to end, on tiny data, as a researcher runs it (issue #15):
convert class folders -> train -> score with a stand-in NIMA -> fine-tune a snapshot on a filtered subset
with frozen down blocks -> post-hoc EMA -> generate -> metrics against two references.

Every CLI runs in-process (CliRunner) on 8x8 images and a few-thousand-parameter network. The labels that
reach the network during fine-tuning are recorded at the loss and compared, image by image, with the
class labels of the dataset's dataset.json."""

import json
import os
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import calculate_metrics
import dataset_tool
import generate_images
import reconstruct_phema
import score_dataset
import train_edm2
from torch_utils import persistence, training_stats
from training import training_loop

CLASSES = ('cat', 'dog', 'eel')  # sorted: convert labels them 0, 1, 2
PER_CLASS = 6
NET_ARGS = ['--preset=edm2-cifar10-32x32-cond', '--channels=8', '--channel-mult=1,2', '--num-blocks=1', '--attn-res=4',
            '--channels-per-head=8', '--dropout=0', '--lr=0.01', '--rampup=0', '--fp16=0', '--workers=0',
            '--device=cpu', '--batch=64', '--status=1Ki', '--snapshot=1Ki', '--checkpoint=2Ki', '--duration=2Ki']


def invoke(command, *args) -> str:
    """Run a CLI in-process; afterwards leave the state a fresh process would have (as tests/conftest.py does)."""
    result = CliRunner().invoke(command, [str(arg) for arg in args])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    training_stats.reset()
    assert result.exit_code == 0, result.output
    return result.output


def write_class_folders(root) -> None:
    """PER_CLASS random 8x8 RGB images per class folder, class c a little brighter than class c - 1."""
    rng = np.random.RandomState(0)
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name)
        for i in range(PER_CLASS):
            pixels = rng.randint(0, 160, size=(8, 8, 3)) + 40 * c
            PIL.Image.fromarray(pixels.astype(np.uint8)).save(root / name / f'{i}.png')


def dataset_labels(data) -> dict:
    """{pixel bytes of an image: its dataset.json class label}."""
    with open(data / 'dataset.json') as f:
        labels = json.load(f)['labels']
    return {np.array(PIL.Image.open(data / name)).transpose(2, 0, 1).tobytes(): label for name, label in labels}


class LabelRecorder:
    """Wraps EDM2Loss.__call__: keeps (pixels, label index) of every training sample."""

    def __init__(self, monkeypatch):
        self.samples = []
        original = training_loop.EDM2Loss.__call__

        def call(loss, net, images, labels, **kwargs):
            pixels = ((images.detach() + 1) * 127.5).round().to(torch.uint8)  # StandardRGBEncoder, inverted
            for image, label in zip(pixels, labels.detach()):
                self.samples.append((image.numpy().tobytes(), label.numpy().copy()))
            return original(loss, net, images, labels, **kwargs)
        monkeypatch.setattr(training_loop.EDM2Loss, '__call__', call)


def test_fork_workflow_end_to_end(cache, tmp_path, monkeypatch):
    # Prepare: class folders -> dataset with dataset.json class labels.
    write_class_folders(tmp_path / 'src')
    data = tmp_path / 'data'
    invoke(dataset_tool.cmdline, 'convert', f'--source={tmp_path / "src"}', f'--dest={data}')
    labels_of = dataset_labels(data)
    assert sorted(labels_of.values()) == sorted(list(range(len(CLASSES))) * PER_CLASS)

    # First stage: a class-conditional network.
    invoke(train_edm2.cmdline, f'--outdir={tmp_path / "base"}', f'--data={data}', '--cond=1', *NET_ARGS)
    base_pkl = tmp_path / 'base' / 'network-snapshot-0000002-0.100.pkl'
    assert base_pkl.is_file()

    # Score the images with the stand-in NIMA; its metadata.json goes to the dataset root.
    invoke(score_dataset.main, f'--images={data}', f'--out={tmp_path / "scores"}', '--metric=nima', '--workers=0',
           '--resolution=0')
    shutil.copy(tmp_path / 'scores' / 'metadata.json', data / 'metadata.json')

    # Second stage: fine-tune on the best images of classes 0 and 2, down blocks frozen.
    recorder = LabelRecorder(monkeypatch)
    output = invoke(train_edm2.cmdline, f'--outdir={tmp_path / "ft"}', f'--data={data}', '--cond=1', *NET_ARGS,
                    f'--model2finetune={base_pkl}', '--categories=0,2', '--top-percent=80', '--top-per-category=80',
                    '--freeze-down=1', '--max-grad-norm=1')
    assert output.count('After filtration there are') == 1
    assert 'After filtration there are 7 images in the dataset (of 18; kept: categories 0,2 and top 80% by NIMA and' \
           ' top 80% of each category by NIMA)' in output
    # The labels that reached the network are the dataset.json labels of the very images they came with.
    assert len(recorder.samples) == 2048
    for pixels, label in recorder.samples:
        assert label.shape == (len(CLASSES),) and label.sum() == 1
        assert int(label.argmax()) == labels_of[pixels] in (0, 2)
    assert len({pixels for pixels, _ in recorder.samples}) == 7
    tuned = persistence.load_pickle(str(tmp_path / 'ft' / 'network-snapshot-0000002-0.100.pkl'))['ema']
    base = persistence.load_pickle(str(base_pkl))['ema']
    unchanged = {name: torch.allclose(p_tuned.float(), p_base.float(), atol=1e-3)  # up to float16 rounding
                 for (name, p_tuned), p_base in zip(tuned.named_parameters(), base.parameters())}
    assert all(same for name, same in unchanged.items() if 'down' in name) and any('down' in name for name in unchanged)
    assert not all(same for name, same in unchanged.items() if 'down' not in name)

    # Post-hoc EMA, sampling every class, metrics against the whole dataset and the curated subset.
    invoke(reconstruct_phema.cmdline, f'--indir={tmp_path / "ft"}', f'--outdir={tmp_path / "phema"}', '--outstd=0.08')
    phema_pkl = next((tmp_path / 'phema').glob('phema-*.pkl'))
    images = tmp_path / 'images'
    invoke(generate_images.cmdline, f'--net={phema_pkl}', f'--outdir={images}', '--seeds=0-5', '--steps=4',
           '--device=cpu')
    refs = tmp_path / 'refs'
    invoke(calculate_metrics.cmdline, 'ref', f'--data={data}', f'--dest={refs / "all.pkl"}', '--metrics=fid',
           '--workers=0')
    invoke(calculate_metrics.cmdline, 'ref', f'--data={data}', f'--dest={refs / "best.pkl"}', '--metrics=fid',
           '--workers=0', '--top-percent=50')
    invoke(calculate_metrics.cmdline, 'calc', f'--images={images}', '--num=all', '--metrics=fid,nima',
           f'--ref={refs / "all.pkl"}', f'--ref={refs / "best.pkl"}', f'--out={tmp_path / "results"}', '--workers=0')
    with open(tmp_path / 'results.json') as f:
        results = json.load(f)
    assert sorted(results['fid']) == ['all', 'best'] and all(np.isfinite(v) for v in results['fid'].values())
    assert sum(results['nima']['histogram']) == 6
    provenance = results['provenance']
    assert provenance['num_images'] == 6 and sorted(provenance['references']) == ['all', 'best']
    assert provenance['images'] == str(images)


if __name__ == '__main__':
    pytest.main([__file__, '-q'])
