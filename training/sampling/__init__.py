"""The library behind `generate_images.py`: sampling presets, the sampler, and `generate_images()`; the EDM v1
samplers and the presets of the published EDM v1 models (`edm1_sampler`, `edm1_presets`)."""
