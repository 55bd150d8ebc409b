# CUDA image for the EDM2 toolkit.
#   docker build --tag edm2 .
#   docker run --gpus all -it --rm -v "$PWD/out:/workspace/edm2/out" edm2 \
#       python generate_images.py --preset=edm2-img512-s-guid-dino --outdir=out
# The base image already ships a CUDA build of PyTorch (2.3 pre-release); pip keeps it (the toolkit asks for torch>=2.3.0a0).
FROM nvcr.io/nvidia/pytorch:24.02-py3

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Versions known to work with the official code (huggingface_hub 0.26.5 is broken for diffusers 0.26.3).
RUN pip install --no-cache-dir huggingface_hub==0.25.2 diffusers==0.26.3 accelerate==0.27.2

WORKDIR /workspace/edm2
COPY . .
RUN pip install --no-cache-dir -e .

# The entry point only runs the given command, as in the official image.
RUN printf '#!/bin/bash\nexec "$@"\n' > /usr/local/bin/entry.sh && chmod +x /usr/local/bin/entry.sh
ENTRYPOINT ["/usr/local/bin/entry.sh"]
CMD ["python", "generate_images.py", "--help"]
