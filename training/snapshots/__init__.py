"""Network snapshots after training: post-hoc EMA reconstruction (the library behind `reconstruct_phema.py`)
and the pickle-free `.safetensors` + `.json` form of a snapshot (`safetensors_format`)."""
