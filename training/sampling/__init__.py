"""The library behind `generate_images.py`: sampling presets, the sampler, and `generate_images()`."""
