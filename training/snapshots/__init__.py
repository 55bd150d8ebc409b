"""Network snapshots after training: post-hoc EMA reconstruction (the library behind `reconstruct_phema.py`, and in memory behind `calculate_metrics.py sweep`)."""
