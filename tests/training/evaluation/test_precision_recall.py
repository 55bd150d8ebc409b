"""training.evaluation.precision_recall against a direct implementation of Kynkäänniemi et al. 2019, Eq. 1-2."""

import numpy as np
import pytest
import torch

from training.evaluation import calculate_metrics as metrics
from training.evaluation import precision_recall as pr


def direct_precision_recall(real, gen, k=3):
    """The paper's definition written out with exact pairwise distances, one point at a time."""
    def radius(x, features):  # ||x - NN_k(x, features)||, x itself (distance 0) not counted
        return np.sort(np.linalg.norm(features - x, axis=1))[k]

    def f(x, features):  # Eq. 1
        return any(np.linalg.norm(x - phi) <= radius(phi, features) for phi in features)

    return np.mean([f(g, real) for g in gen]), np.mean([f(r, gen) for r in real])


def random_sets(seed, n_real=40, n_gen=30, dim=6, shift=0.7, scale=1.4):
    rng = np.random.RandomState(seed)
    return rng.randn(n_real, dim), shift + scale * rng.randn(n_gen, dim)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_matches_the_direct_definition(seed):
    real, gen = random_sets(seed)
    expected = direct_precision_recall(real, gen)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # neither trivial
    assert pr.precision_recall(real, gen) == pytest.approx(expected, abs=1e-12)
    # Blocks of a few rows give the same values as one block (memory-bounded computation).
    assert pr.precision_recall(real, gen, max_block_bytes=8 * 40 * 3) == pytest.approx(expected, abs=1e-12)


def test_other_k_and_float32_input():
    real, gen = random_sets(3)
    expected = direct_precision_recall(real, gen, k=5)
    real32, gen32 = real.astype(np.float32), gen.astype(np.float32)
    assert pr.precision_recall(real32, gen32, k=5) == pytest.approx(
        direct_precision_recall(real32.astype(np.float64), gen32.astype(np.float64), k=5))
    assert pr.precision_recall(real, gen, k=5) == pytest.approx(expected)


def test_identical_sets_give_one_and_far_apart_sets_zero():
    real, _ = random_sets(4, n_real=50, dim=16)
    assert pr.precision_recall(real, real) == (1.0, 1.0)
    assert pr.precision_recall(real, torch.as_tensor(real.copy())) == (1.0, 1.0)
    assert pr.precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_knn_radii_are_the_kth_neighbour_distances():
    features = np.arange(6, dtype=np.float64)[:, None] ** 2  # points 0, 1, 4, 9, 16, 25 on a line
    radii = pr.knn_radii(torch.as_tensor(features), k=2).sqrt().numpy()
    np.testing.assert_allclose(radii, [4, 3, 4, 7, 9, 16])


def test_bad_input():
    real, gen = random_sets(5)
    with pytest.raises(metrics.MetricsError, match='at least 4 generated'):
        pr.precision_recall(real, gen[:3])
    with pytest.raises(metrics.MetricsError, match='feature dimensions differ'):
        pr.precision_recall(real, gen[:, :4])


def test_metric_names():
    assert pr.parse_metrics_with_pr('pr, fid,fd_dinov2') == ['fid', 'fd_dinov2', 'pr']
    assert pr.parse_metrics_with_pr('fid,nima') == ['fid', 'nima']
    assert pr.pr_result_names(['fid', 'fd_dinov2', 'pr']) == [
        'precision_inception', 'recall_inception', 'precision_dinov2', 'recall_dinov2']
    assert pr.feature_metrics(['fd_dinov2', 'nima', 'pr']) == ['fd_dinov2'] and pr.feature_metrics(['fid']) == []
    with pytest.raises(metrics.MetricsError, match='needs fid and/or fd_dinov2'):
        pr.parse_metrics_with_pr('nima,pr')
    with pytest.raises(metrics.MetricsError, match='Invalid metric "prr"'):
        pr.parse_metrics_with_pr('fid,prr')


def test_results_against_named_references():
    real, gen = random_sets(6)
    refs = dict(a=dict(fid=dict(features=real)), b=dict(fid=dict(features=gen)))
    stats = dict(fid=dict(features=gen))
    results = pr.calculate_pr_results(stats, refs, ['fid', 'pr'])
    assert results == dict(precision_inception=dict(a=pytest.approx(direct_precision_recall(real, gen)[0]), b=1.0),
                           recall_inception=dict(a=pytest.approx(direct_precision_recall(real, gen)[1]), b=1.0))
    with pytest.raises(metrics.MetricsError, match='--ref c: no fid features'):
        pr.check_references(dict(c=dict(fid=dict(mu=0))), ['fid', 'pr'])
    pr.check_references(dict(c=dict(fid=dict(mu=0))), ['fid'])  # features only needed with pr
