"""The library behind `calculate_metrics.py`, `score_dataset.py` and `count_flops.py`: feature detectors, statistics, Frechet distances, per-image scores and FLOP counts."""
