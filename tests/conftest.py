"""Shared fixtures of the cropi tests: a tiny local cropi Qwen2 policy and generated SFT tasks (no hub
access). cropi is imported inside the fixtures, so that the sketchstore tests, which take fixtures of
the same names from sketchstore_fixtures.py, run with cropi absent."""

from __future__ import annotations

import pytest

from sketchstore.data import write_rows


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from cropi.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory):
    from cropi.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-other", size="tiny", seed=1)


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory):
    """(train.jsonl, val.jsonl): 24 and 6 generated math tasks with reference responses."""
    from cropi.tasks import generate_tasks

    root = tmp_path_factory.mktemp("data")
    train = write_rows(generate_tasks(24, seed=1), root / "train.jsonl")
    val = write_rows(generate_tasks(6, seed=2), root / "val.jsonl")
    return train, val
