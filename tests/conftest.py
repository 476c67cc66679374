"""Shared fixtures: a synthetic data set and tiny trained models (built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from tests.synthetic import make_dataset  # noqa: E402
from training.config import TrainConfig, preset  # noqa: E402

#: Tiny networks: no downloads, small decoder, a few steps. Quality is irrelevant here.
TINY = dict(encoder_weights="none", decoder_filters=(16, 16, 16, 16), batch_size=2, epochs=1, steps_per_epoch=2)


def tiny_config(kind: str) -> TrainConfig:
    if kind == "reference":
        return preset("reference").override(image_size=64, **TINY)
    return preset("best").override(image_size=64, canonical_diameter=12.0, **TINY)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("dsb") / "stage1_train")


@pytest.fixture(scope="session")
def tile_run(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 3-class, tile-mode model trained and exported by the real training code."""
    from training.train import train

    run = tmp_path_factory.mktemp("run_tile")
    train(tiny_config("best"), dataset_dir, run, evaluate_after=False)
    return run


@pytest.fixture(scope="session")
def tile_model_dir(tile_run: Path) -> Path:
    return tile_run / "model"


@pytest.fixture(scope="session")
def loaded_model(tile_model_dir: Path):
    from service.model import SegmentationModel

    return SegmentationModel.load(tile_model_dir)
