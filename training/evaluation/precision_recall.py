"""Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models", Sec. 3), in the Inception (`fid`) and DINOv2 (`fd_dinov2`) feature spaces.

Each feature set Phi stands for its manifold, the union of the balls around its points with radius the
distance to the k-th nearest neighbour in the same set (the point itself not counted), k = 3:

    f(phi, Phi) = 1  if  ||phi - phi'|| <= ||phi' - NN_k(phi', Phi)||  for at least one phi' in Phi,  else 0   (Eq. 1)
    precision(Phi_r, Phi_g) = mean over phi_g in Phi_g of f(phi_g, Phi_r)
    recall(Phi_r, Phi_g)    = mean over phi_r in Phi_r of f(phi_r, Phi_g)                                      (Eq. 2)

Distances are computed in float64 on the compute device, a block of rows at a time, so memory stays at
`max_block_bytes` per block whatever the set sizes (50,000 x 50,000 distances would need 20 GB at once).
Generated features are collected during the statistics pass (`StatsAccumulator(keep_features=...)`),
reference features come from the reference statistics file (`calculate_metrics.py ref --features`).
"""

from typing import Sequence, Union

import numpy as np
import torch

from training.evaluation.calculate_metrics import MetricsError, parse_metric_list

DEFAULT_K = 3
MAX_BLOCK_BYTES = 256 << 20  # one block of float64 distances

# Detector metric -> name of its feature space in the precision/recall result names.
FEATURE_SPACES = {'fid': 'inception', 'fd_dinov2': 'dinov2'}
PR_METRIC = 'pr'  # in a --metrics list: precision and recall in every listed feature space


def pr_result_names(metrics: Sequence[str]) -> list:
    """['fid', 'fd_dinov2', 'pr'] ->
    ['precision_inception', 'recall_inception', 'precision_dinov2', 'recall_dinov2']."""
    if PR_METRIC not in metrics:
        return []
    return [f'{kind}_{FEATURE_SPACES[m]}' for m in metrics if m in FEATURE_SPACES for kind in ('precision', 'recall')]


def feature_metrics(metrics: Sequence[str]) -> list:
    """The detector metrics whose per-image features precision/recall needs (none without 'pr')."""
    return [m for m in metrics if m in FEATURE_SPACES] if PR_METRIC in metrics else []

#----------------------------------------------------------------------------
# The metric.


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 for all pairs, [len(a), len(b)], clamped at 0 against round-off."""
    return (a.square().sum(1, keepdim=True) + b.square().sum(1)[None, :] - 2 * (a @ b.T)).clamp_(min=0)


def _block_rows(num_columns: int, max_block_bytes: int) -> int:
    return max(1, max_block_bytes // (8 * max(num_columns, 1)))


def knn_radii(features: torch.Tensor, k: int = DEFAULT_K, max_block_bytes: int = MAX_BLOCK_BYTES) -> torch.Tensor:
    """Squared ||phi' - NN_k(phi', Phi)|| of Eq. 1 for every phi' of `features` [N, D] (float64):
    the (k+1)-th smallest distance of each row, the smallest being the point itself."""
    rows = _block_rows(features.shape[0], max_block_bytes)
    return torch.cat([_squared_distances(block, features).kthvalue(k + 1, dim=1).values
                      for block in features.split(rows)])


def precision_recall(real: Union[np.ndarray, torch.Tensor], gen: Union[np.ndarray, torch.Tensor], k: int = DEFAULT_K,
                     device: Union[str, torch.device] = 'cpu', max_block_bytes: int = MAX_BLOCK_BYTES) -> tuple:
    """(precision, recall) of Eq. 2 for real features [N_r, D] and generated features [N_g, D]."""
    real = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)
    gen = torch.as_tensor(np.asarray(gen), dtype=torch.float64, device=device)
    for name, feats in (('reference', real), ('generated', gen)):
        if feats.ndim != 2 or feats.shape[0] <= k:
            raise MetricsError(f'precision/recall needs at least {k + 1} {name} feature vectors, got {feats.shape[0]}')
    if real.shape[1] != gen.shape[1]:
        raise MetricsError(f'feature dimensions differ: {gen.shape[1]} vs {real.shape[1]} '
                           '(reference from another detector?)')
    real_radii, gen_radii = knn_radii(real, k, max_block_bytes), knn_radii(gen, k, max_block_bytes)
    gen_in_real = torch.zeros(gen.shape[0], dtype=torch.bool, device=device)
    real_in_gen = torch.zeros(real.shape[0], dtype=torch.bool, device=device)
    rows = _block_rows(real.shape[0], max_block_bytes)
    for start in range(0, gen.shape[0], rows):
        d2 = _squared_distances(gen[start:start + rows], real)                               # [rows, N_r]
        gen_in_real[start:start + rows] = (d2 <= real_radii[None, :]).any(dim=1)             # f(phi_g, Phi_r)
        real_in_gen |= (d2 <= gen_radii[start:start + rows, None]).any(dim=0)                # f(phi_r, Phi_g)
    return gen_in_real.double().mean().item(), real_in_gen.double().mean().item()

#----------------------------------------------------------------------------
# Against named references.


def check_references(refs: dict, metrics: Sequence[str]) -> None:
    """Fail before the long computation when a reference lacks the features precision/recall needs."""
    for name, ref in refs.items():
        for metric in feature_metrics(metrics):
            if 'features' not in ref.get(metric, {}):
                raise MetricsError(f'--ref {name}: no {metric} features stored for precision/recall; recompute it '
                                   f'with "calculate_metrics.py ref --metrics={metric} --features=50000" '
                                   '(or drop pr from --metrics)')


def calculate_pr_results(stats: dict, refs: dict, metrics: Sequence[str], k: int = DEFAULT_K,
                         device: Union[str, torch.device] = 'cpu', verbose: bool = False) -> dict:
    """{'precision_<space>': {ref name: value}, 'recall_<space>': {...}} for every feature metric in `metrics`
    ('pr' listed), from the generated features `stats[metric]['features']` and each reference's."""
    results = dict()
    for metric in feature_metrics(metrics):
        space = FEATURE_SPACES[metric]
        precision = results.setdefault(f'precision_{space}', dict())
        recall = results.setdefault(f'recall_{space}', dict())
        for name, ref in refs.items():
            precision[name], recall[name] = precision_recall(ref[metric]['features'], stats[metric]['features'], k,
                                                             device=device)
            if verbose:
                print(f'{metric} on {name}: precision = {precision[name]:g}, recall = {recall[name]:g}')
    return results


def parse_metrics_with_pr(metrics: Union[str, Sequence[str]]) -> list:
    """'fid,fd_dinov2,pr' -> ['fid', 'fd_dinov2', 'pr']: detector metrics as `parse_metric_list` checks them,
    then 'pr' (precision/recall), which needs fid and/or fd_dinov2 in the same list for its feature space."""
    names = [m.strip() for m in metrics.split(',')] if isinstance(metrics, str) else list(metrics)
    wanted = PR_METRIC in names
    parsed = parse_metric_list([m for m in names if m != PR_METRIC]) + ([PR_METRIC] if wanted else [])
    if wanted and not feature_metrics(parsed):
        raise MetricsError('pr (precision/recall) needs fid and/or fd_dinov2 in the list for its feature space')
    return parsed
