"""The library behind `dataset_tool.py` (convert, encode, decode, process-and-encode), the image transforms, the node-local dataset cache, and the demo's digits dataset."""
