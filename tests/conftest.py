"""Shared fixtures: a tiny local Qwen2 policy and generated SFT data (no hub access)."""

from __future__ import annotations

import pytest

from cropi.tasks import generate_tasks
from cropi.tiny_model import build_tiny_model
from sketchstore.data import write_rows


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-other", size="tiny", seed=1)


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory):
    """(train.jsonl, val.jsonl): 24 and 6 generated math tasks with reference responses."""
    root = tmp_path_factory.mktemp("data")
    train = write_rows(generate_tasks(24, seed=1), root / "train.jsonl")
    val = write_rows(generate_tasks(6, seed=2), root / "val.jsonl")
    return train, val
