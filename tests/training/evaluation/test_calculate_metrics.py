"""training.evaluation.calculate_metrics: Fréchet distance, statistics accumulation, stats files, result files."""

import json
import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch

from training.evaluation import detectors
from training.evaluation import calculate_metrics as metrics




def random_stats(dim, seed, n=None):
    rng = np.random.RandomState(seed)
    a = rng.randn(dim, n or 2 * dim)
    return rng.randn(dim), a @ a.T / a.shape[1]

#----------------------------------------------------------------------------
# Fréchet distance.


def test_fd_of_stats_with_itself_is_zero():
    mu, sigma = random_stats(64, 0)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) <= 1e-6


def test_fd_matches_closed_form_for_diagonal_covariances():
    rng = np.random.RandomState(1)
    mu1, mu2 = rng.randn(16), rng.randn(16)
    d1, d2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    # FD = |mu1 - mu2|^2 + sum (d1 + d2 - 2 sqrt(d1 d2)) for diagonal covariances.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    assert metrics.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-10)


def test_fd_singular_covariances_stay_real_and_exact():
    # Rank-deficient covariances (fewer images than dimensions) as with small samples.
    mu, sigma = random_stats(32, 2, n=5)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    d1, d2 = np.array([0.0, 1.0, 4.0, 0.0]), np.array([1.0, 0.0, 1.0, 0.0])
    expected = np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    assert metrics.frechet_distance(np.zeros(4), np.diag(d1), np.zeros(4), np.diag(d2)) == pytest.approx(expected, abs=1e-6)
    # The eigen form agrees with scipy's sqrtm on a well-conditioned pair.
    _, s2 = random_stats(32, 3)
    assert metrics._trace_sqrt_product_eig(sigma + np.eye(32), s2) == pytest.approx(
        np.trace(__import__('scipy.linalg').linalg.sqrtm((sigma + np.eye(32)) @ s2)).real, rel=1e-8)


def test_fd_dimension_mismatch():
    with pytest.raises(metrics.MetricsError, match='feature dimensions differ'):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))

#----------------------------------------------------------------------------
# Accumulation.


def test_stats_match_numpy_and_histogram(cache):
    rng = np.random.RandomState(0)
    batches = [torch.from_numpy(rng.randint(0, 256, [n, 3, 16, 16]).astype(np.uint8)) for n in (5, 3, 6)]
    records = list(metrics.calculate_stats_for_iterable(
        [dict(images=batches[0]), (batches[1], None), batches[2], dict(images=None)], metrics=['fd_dinov2', 'nima'],
        verbose=False, device='cpu'))
    assert [r.stats is None for r in records] == [True] * 3 + [False]
    stats = records[-1].stats
    assert stats['num_images'] == 14
    every = torch.cat(batches)
    for metric in ('fd_dinov2', 'nima'):
        features = detectors.get_detector(metric)(every).double().numpy()
        np.testing.assert_allclose(stats[metric]['mu'], features.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats[metric]['sigma'], np.atleast_2d(np.cov(features, rowvar=False)), rtol=1e-5, atol=1e-9)
    assert 'histogram' not in stats['fd_dinov2']
    hist = stats['nima']['histogram']
    assert hist.shape == (100,) and hist.sum() == 14
    scores = detectors.get_detector('nima')(every)[:, 0].double().numpy()
    expected_bins = np.clip(np.round(scores * 10), 1, 100).astype(int) - 1
    np.testing.assert_array_equal(np.nonzero(hist)[0], np.unique(expected_bins))


def test_grayscale_images_are_repeated(cache):
    gray = torch.randint(0, 256, [4, 1, 16, 16], dtype=torch.uint8)
    a = metrics.run_with_progress(metrics.calculate_stats_for_iterable([gray], ['nima'], False, device='cpu'), 1, False)
    b = metrics.run_with_progress(metrics.calculate_stats_for_iterable([gray.repeat(1, 3, 1, 1)], ['nima'], False, device='cpu'), 1, False)
    np.testing.assert_allclose(a['nima']['mu'], b['nima']['mu'])
    with pytest.raises(metrics.MetricsError, match='latent'):
        list(metrics.calculate_stats_for_iterable([torch.zeros([2, 8, 4, 4], dtype=torch.uint8)], ['nima'], verbose=False, device='cpu'))


def test_fewer_than_two_images(cache):
    with pytest.raises(metrics.MetricsError, match='need at least 2'):
        list(metrics.calculate_stats_for_iterable([torch.zeros([1, 3, 8, 8], dtype=torch.uint8)], ['nima'], verbose=False, device='cpu'))
    with pytest.raises(metrics.MetricsError, match='Found 0 images'):  # an empty iterable: one closing record
        list(metrics.calculate_stats_for_iterable([], ['nima'], verbose=False, device='cpu'))


def _official_stats(records):
    """Consume progress records as scripts written for the official library do."""
    stats, seen = None, []
    for r in records:
        seen.append(r)
        if r.num_batches is not None and r.batch_idx == r.num_batches - 1:  # None: len-less input, until the last
            stats = r.stats
    return stats, seen


@pytest.mark.parametrize('with_len', [True, False])
def test_last_batch_record_carries_the_stats(cache, tmp_path, with_len):
    batches = [torch.randint(0, 256, [n, 3, 8, 8], dtype=torch.uint8) for n in (3, 2, 4)]
    dest = tmp_path / 'stats.pkl'
    records = metrics.calculate_stats_for_iterable(batches if with_len else iter(batches), ['nima'], verbose=False,
                                                   dest_path=str(dest), device='cpu')
    if with_len:
        assert len(records) == 3
    stats, seen = _official_stats(records)
    assert len(seen) == 3 and [r.batch_idx for r in seen] == [0, 1, 2]  # one record per batch, none extra
    assert [r.stats is None for r in seen] == [True, True, False] and seen[-1].images is batches[-1]
    assert stats['num_images'] == 9 and seen[-1].num_batches == 3
    assert metrics.load_stats(str(dest), verbose=False)['nima']['mu'] == pytest.approx(stats['nima']['mu'])


def test_num_images_is_all_reduced_at_every_batch(cache, monkeypatch):
    batches = [torch.randint(0, 256, [n, 3, 8, 8], dtype=torch.uint8) for n in (3, 2, 4)]
    records = list(metrics.calculate_stats_for_iterable(batches, ['nima'], verbose=False, device='cpu'))
    assert [r.num_images for r in records] == [3, 5, 9]  # single process: the running total
    # Two identical ranks: every record shows the sum over ranks, not this rank's own count.
    monkeypatch.setattr(metrics, '_all_reduce', lambda tensor: tensor * 2)
    records = list(metrics.calculate_stats_for_iterable(batches, ['nima'], verbose=False, device='cpu'))
    assert [r.num_images for r in records] == [6, 10, 18] and records[-1].stats['num_images'] == 18


def test_device_default_is_cuda_and_checked():
    import inspect
    for fn in (metrics.calculate_stats_for_iterable, metrics.calculate_stats_for_network):
        assert inspect.signature(fn).parameters['device'].default == 'cuda'
    if not torch.cuda.is_available():  # CPU-only machine: one clear error, before any detector is set up
        with pytest.raises(metrics.MetricsError, match='device: CUDA is not available'):
            metrics.calculate_stats_for_iterable([], ['nima'], verbose=False)


def test_rank_batches_keep_empty_chunks(monkeypatch):
    # 2 items on 4 ranks: ranks 2 and 3 get one empty batch each, so all ranks run the same collectives.
    monkeypatch.setattr(metrics.dist, 'get_world_size', lambda: 4)
    monkeypatch.setattr(metrics.dist, 'get_rank', lambda: 3)
    assert metrics.rank_batches(2, 64) == [[]]
    batch, = list(metrics.make_loader(list(range(2)), 64, num_workers=0))
    assert batch == dict(images=None, skipped=[], errors=[])


def test_parse_metric_list():
    assert metrics.parse_metric_list('fid, nima,fid') == ['fid', 'nima']
    with pytest.raises(metrics.MetricsError, match='Invalid metric "is"'):
        metrics.parse_metric_list('fid,is')

#----------------------------------------------------------------------------
# Statistics files.


def test_stats_pkl_and_npz_round_trip(tmp_path):
    mu, sigma = random_stats(8, 4)
    stats = dict(num_images=10, fid=dict(mu=mu, sigma=sigma), fd_dinov2=dict(mu=mu[:4], sigma=sigma[:4, :4]))
    metrics.save_stats(stats, str(tmp_path / 'sub' / 'refs.pkl'))
    loaded = metrics.load_stats(str(tmp_path / 'sub' / 'refs.pkl'), verbose=False)
    np.testing.assert_array_equal(loaded['fd_dinov2']['sigma'], sigma[:4, :4])
    metrics.save_stats(stats, str(tmp_path / 'refs.NPZ'))
    v1 = metrics.load_stats(str(tmp_path / 'refs.NPZ'), verbose=False)
    assert list(v1) == ['fid']
    np.testing.assert_array_equal(v1['fid']['mu'], mu)
    assert metrics.calculate_metrics_from_stats(stats, v1, ['fid', 'fd_dinov2'], verbose=False) == {'fid': pytest.approx(0, abs=1e-6)}


@pytest.mark.parametrize('content', [b'', b'not a pickle at all', pickle.dumps([1, 2, 3]),
                                     pickle.dumps(dict(fid=dict(mu=np.zeros(3), sigma=np.zeros(2))))])
def test_bad_stats_files(tmp_path, content):
    path = tmp_path / 'bad.pkl'
    path.write_bytes(content)
    with pytest.raises(metrics.MetricsError) as info:
        metrics.load_stats(str(path), verbose=False)
    assert str(path) in str(info.value) and '\n' not in str(info.value)


def test_missing_and_unsafe_stats_files(tmp_path):
    with pytest.raises(metrics.MetricsError, match='missing.pkl'):
        metrics.load_stats(str(tmp_path / 'missing.pkl'), verbose=False)
    unsafe = tmp_path / 'unsafe.pkl'
    unsafe.write_bytes(pickle.dumps({'fid': os.getcwd}))  # a global outside the safe list
    with pytest.raises(metrics.MetricsError, match='unsafe.pkl'):
        metrics.load_stats(str(unsafe), verbose=False)

#----------------------------------------------------------------------------
# Results (fork): several references, scorers, merged result files, histograms.


def test_results_multiple_refs_and_scorer_summary(tmp_path):
    mu, sigma = random_stats(6, 5)
    stats = dict(num_images=20, fid=dict(mu=mu, sigma=sigma),
                 nima=dict(mu=np.array([5.0]), sigma=np.array([[0.25]]), histogram=np.arange(100.0)))
    refs = dict(a=dict(fid=dict(mu=mu, sigma=sigma)), b=dict(fid=dict(mu=mu + 1, sigma=sigma)), c=dict())
    results = metrics.calculate_results(stats, refs, ['fid', 'nima'], verbose=False)
    assert results['metrics']['fid'] == {'a': pytest.approx(0, abs=1e-6), 'b': pytest.approx(6)}
    assert results['metrics']['nima']['sigma'] == 0.5 and results['metrics']['nima']['variance'] == 0.25  # docs/differences.md#metrics-1
    base = str(tmp_path / 'out' / 'results')
    written = metrics.save_results(results, base, ['fid', 'nima'], hist=True, provenance=dict(command='calc'),
                                   num_images=20)
    with open(base + '.json') as f:
        data = json.load(f)
    assert data['fid'] == {'a': pytest.approx(0, abs=1e-6), 'b': pytest.approx(6)} and data['provenance'] == {'command': 'calc'}
    assert data['nima']['mu'] == 5.0 and len(data['nima']['histogram']) == 100
    with open(base + '.pkl', 'rb') as f:
        features = pickle.load(f)
    np.testing.assert_array_equal(features['fid']['mean'], mu)  # the fork's name; 'mu' makes it a reference file
    assert features['fid']['mu'] is features['fid']['mean'] and features['num_images'] == 20
    assert written[-1] == base + '-nima.png'
    with PIL.Image.open(written[-1]) as image:
        assert image.format == 'PNG' and image.size[0] > 100


def test_unreadable_existing_results_fail_early(tmp_path):
    base = str(tmp_path / 'results')
    with open(base + '.json', 'w') as f:
        f.write('{broken')
    with pytest.raises(metrics.MetricsError, match='results.json'):
        metrics.check_output_base(base)
    with open(base + '.json') as f:
        assert f.read() == '{broken'  # nothing lost


def test_duplicate_reference_names(tmp_path):
    with pytest.raises(metrics.MetricsError, match='two references are named "img"'):
        metrics.load_references([str(tmp_path / 'a' / 'img.pkl'), str(tmp_path / 'b' / 'img.npz')], verbose=False)


def test_failed_pickle_write_leaves_no_result_file(tmp_path, monkeypatch):
    mu, sigma = random_stats(6, 5)
    stats = dict(num_images=20, fid=dict(mu=mu, sigma=sigma))
    results = metrics.calculate_results(stats, dict(a=dict(fid=dict(mu=mu, sigma=sigma))), ['fid'], verbose=False)

    def full_disk(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(metrics.persistence, 'dump_portable', full_disk)
    with pytest.raises(OSError):
        metrics.save_results(results, str(tmp_path / 'results'), ['fid'])
    assert os.listdir(tmp_path) == []  # neither file, no temporary left behind


def test_statistics_files_use_numpy_names_every_numpy_has(tmp_path):
    """The official tools may run numpy < 1.26, which cannot import numpy 2's numpy._core names."""
    mu, sigma = random_stats(6, 5)
    stats = dict(num_images=20, fid=dict(mu=mu, sigma=sigma))
    metrics.save_stats(stats, str(tmp_path / 'ref.pkl'))
    results = metrics.calculate_results(stats, dict(a=dict(fid=dict(mu=mu, sigma=sigma))), ['fid'], verbose=False)
    metrics.save_results(results, str(tmp_path / 'results'), ['fid'])
    for name in ('ref.pkl', 'results.pkl'):
        assert b'_core' not in (tmp_path / name).read_bytes(), name
    loaded = metrics.load_stats(str(tmp_path / 'ref.pkl'), verbose=False)
    assert np.array_equal(loaded['fid']['sigma'], sigma) and loaded['fid']['sigma'].dtype == sigma.dtype


def test_readable_images_pass_shape_errors_on_and_skip_corrupt_files(tmp_path):
    from training import dataset
    os.makedirs(tmp_path / 'd')
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'd' / 'a.png')
    PIL.Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / 'd' / 'b.png')
    (tmp_path / 'd' / 'c.png').write_bytes(b'not a png')
    items = metrics.ReadableImages(dataset.ImageFolderDataset(str(tmp_path / 'd')))
    assert items[0][0].shape == (3, 8, 8)
    assert items[1][:2] == (None, 'b.png') and items[1][2] == (
        'b.png: image shape [3, 4, 4] != dataset shape [3, 8, 8] (all images must have the same size and channels;'
        ' see --resolution)')
    assert items[2] == (None, 'c.png', None)
