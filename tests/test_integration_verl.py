"""CROPI as a verl curriculum sampler, against verl's own interface on CPU: verl's
``create_rl_sampler`` loads it by class path (as verl's CPU sampler test does), verl's
``RLHFDataset`` and ``StatefulDataLoader`` feed it as ``RayPPOTrainer`` does, and ``update``
after each step moves it to the next stage's selection from the sketch store. verl's training
loop itself needs GPUs and is not run here."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import AutoTokenizer
from verl import DataProto
from verl.experimental.dataset.sampler import AbstractCurriculumSampler
from verl.trainer.main_ppo import create_rl_sampler
from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

from cropi.errors import BadConfigError
from cropi.integrations.verl import CROPISampler
from cropi.threads import torch_threads
from sketchstore import BuildConfig, ProjectionSpec, SketchStore, SplitRef, build_sketches, score, select
from sketchstore.data import read_rows

BATCH = 3
FRACTION = 0.25  # 6 of the 24 prompts: two batches per epoch
STEPS_PER_STAGE = 3  # the stage changes mid-epoch


@pytest.fixture(scope="module")
def store(tiny_model, other_tiny_model, sft_data, tmp_path_factory):
    """Sketches and scores of checkpoints stage0 and stage1 (two different models), as
    `sketch build` / `sketch score` leave them."""
    path = tmp_path_factory.mktemp("verl") / "store"
    train, val = sft_data
    with torch_threads(1):
        for name, model in (("stage0", tiny_model), ("stage1", other_tiny_model)):
            for split, data in (("pool", train), ("val", val)):
                build_sketches(BuildConfig(model=model, data=data, store=path, checkpoint=name, split=split,
                                           spec=ProjectionSpec(dim=256, seed=0)), progress=False)
            score(SketchStore.open(path, writable=True), SplitRef(name, "pool"), [SplitRef(name, "val")],
                  progress=False)
    return path


@pytest.fixture(scope="module")
def verl_parquet(sft_data, tmp_path_factory):
    """The pool in verl's RL data format (chat prompt, reward_model, extra_info.index = our id)."""
    rows = read_rows(sft_data[0])
    path = tmp_path_factory.mktemp("verl-data") / "train.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"data_source": "cropi", "prompt": [{"role": "user", "content": r["prompt"]}], "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": r["answer"]}, "extra_info": {"index": r["id"]}}
        for r in rows]), path)
    return path


def data_config(store, tmp_path, **sampler):
    return OmegaConf.create({
        "sampler": {"class_path": "pkg://cropi.integrations.verl", "class_name": "CROPISampler",
                    "store": str(store), "val": ["val"], "checkpoints": ["stage0", "stage1"],
                    "steps_per_stage": STEPS_PER_STAGE, "fraction": FRACTION, **sampler},
        "dataloader_num_workers": 0, "train_batch_size": BATCH, "shuffle": True, "seed": 0,
        "max_prompt_length": 256, "cache_dir": str(tmp_path / "cache"), "filter_overlong_prompts_workers": 1})


def stage_ids(store, name):
    return [s.id for s in select(SketchStore.open(store), SplitRef(name, "pool"), [SplitRef(name, "val")],
                                 top=FRACTION)]


def loader_for(config, dataset):
    """verl's sampler and dataloader for ``config``, built as RayPPOTrainer builds them."""
    sampler = create_rl_sampler(config, dataset)
    return sampler, StatefulDataLoader(dataset=dataset, batch_size=config.train_batch_size, num_workers=0,
                                       drop_last=True, collate_fn=collate_fn, sampler=sampler)


def train_steps(sampler, loader, steps):
    """The prompt ids of each batch of ``steps`` steps, looping like RayPPOTrainer.fit."""
    seen = []
    while len(seen) < steps:
        for batch_dict in loader:
            batch = DataProto.from_single_dict(batch_dict)
            seen.append(sorted(e["index"] for e in batch.non_tensor_batch["extra_info"]))
            sampler.update(batch=batch)
            if len(seen) == steps:
                break
    return seen


def batches(config, dataset, steps):
    sampler, loader = loader_for(config, dataset)
    return sampler, train_steps(sampler, loader, steps)


def test_verl_loads_sampler_and_it_follows_the_stages(store, verl_parquet, tiny_model, tmp_path):
    config = data_config(store, tmp_path)
    dataset = RLHFDataset(str(verl_parquet), AutoTokenizer.from_pretrained(str(tiny_model)), config.copy())
    sampler, seen = batches(config, dataset, 5)
    assert isinstance(sampler, CROPISampler) and isinstance(sampler, AbstractCurriculumSampler)
    assert len(sampler) == 6 and sampler.stage == 1
    first, second = stage_ids(store, "stage0"), stage_ids(store, "stage1")
    assert first != second
    assert sorted(seen[0] + seen[1]) == sorted(first)  # epoch 0: exactly stage 0's selection
    assert set(seen[2]) <= set(first)  # step 3 still in stage 0
    assert sorted(seen[3] + seen[4]) == sorted(second)  # after 3 updates: exactly stage 1's selection


def test_missing_scores_and_bad_config(store, verl_parquet, tiny_model, tmp_path):
    config = data_config(store, tmp_path, checkpoints=["stage0", "stage9"])
    dataset = RLHFDataset(str(verl_parquet), AutoTokenizer.from_pretrained(str(tiny_model)), config.copy())
    with pytest.raises(BadConfigError, match="stage 1: no sketches for checkpoint:split stage9:val"):
        batches(config, dataset, STEPS_PER_STAGE + 1)
    with pytest.raises(BadConfigError, match="data.sampler.val is required"):
        create_rl_sampler(data_config(store, tmp_path, val=None), dataset)
    with pytest.raises(BadConfigError, match="data.sampler.fusion must be one of"):
        create_rl_sampler(data_config(store, tmp_path, fusion="sum"), dataset)
    with pytest.raises(BadConfigError, match="no field 'extra_info.id'"):
        create_rl_sampler(data_config(store, tmp_path, id_key="extra_info.id"), dataset)
    with pytest.raises(AssertionError, match="num_workers must be 0"):  # verl's own check
        create_rl_sampler(OmegaConf.merge(data_config(store, tmp_path), {"dataloader_num_workers": 2}), dataset)


def test_resumes_from_the_dataloader_state(store, verl_parquet, tiny_model, tmp_path):
    """verl checkpoints StatefulDataLoader.state_dict(), which holds the sampler's state: a run
    resumed after step 4 (stage 1, mid-epoch) draws what the uninterrupted run draws."""
    config = data_config(store, tmp_path)
    dataset = RLHFDataset(str(verl_parquet), AutoTokenizer.from_pretrained(str(tiny_model)), config.copy())
    _, whole = batches(config, dataset, 7)
    sampler, loader = loader_for(config, dataset)
    assert train_steps(sampler, loader, 4) == whole[:4]
    state = loader.state_dict()
    sampler, loader = loader_for(config, dataset)
    loader.load_state_dict(state)  # applied to the sampler when the next epoch iterator starts
    assert train_steps(sampler, loader, 3) == whole[4:]
    assert (sampler.step, sampler.stage) == (7, 1)
