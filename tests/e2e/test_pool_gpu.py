"""The pool on real GPUs with the tiny pipeline: `OVIS_DEVICES=auto` serves from every visible
GPU with `OVIS_WORKERS` pipelines each, a seed gives the same bytes whichever thread runs it, and
stopping gives every device its memory back. Skipped, with the reason shown, without CUDA."""

import time

import pytest
import torch
from litestar.testing import TestClient

from ovis_service.app import create_app
from ovis_service.config import Settings

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

BODY = {"prompt": "a red fox", "num_inference_steps": 4, "image_size": 512, "seed": 3}


def test_every_gpu_serves_and_gets_its_memory_back() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gpus = torch.cuda.device_count()
    before = [torch.cuda.memory_allocated(index) for index in range(gpus)]
    app = create_app(Settings(model="tiny", warmup=False, workers=2))
    with TestClient(app) as client:
        deadline = time.monotonic() + 120
        while (health := client.get("/health")).status_code != 200:
            assert time.monotonic() < deadline, health.json()
            time.sleep(0.1)
        devices = [device["device"] for device in health.json()["devices"]]
        assert len(devices) == 2 * gpus
        assert all(device.startswith("cuda:") for device in devices), devices
        images = {client.post("/generate", json=BODY).content for _ in range(2 * gpus)}
        assert len(images) == 1  # the same bytes from every thread that ran it
    after = [torch.cuda.memory_allocated(index) for index in range(gpus)]
    assert after == before
