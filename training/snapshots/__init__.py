"""Network snapshots after training: the one snapshot loader (`loading`), post-hoc EMA reconstruction (the
library behind `reconstruct_phema.py`, and in memory behind `calculate_metrics.py sweep`), and the pickle-free
`.safetensors` + `.json` form of a snapshot (`safetensors_format`)."""
