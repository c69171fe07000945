"""The embedded sketch-flow demo: build -> score -> select -> prune on a local policy and task pool.

Everything is made here, offline: a warm-started small Qwen2 (cached after the first run),
a pool of generated math tasks of two families and four difficulty levels, and a validation
set drawn from one family only. Influence selection should then prefer pool prompts of the
validation family; the report compares the selection with the pool and a random pick.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sketchstore import (
    BuildConfig,
    ProjectionSpec,
    ScoreOptions,
    SketchStore,
    SplitRef,
    build_sketches,
    export_selection,
    prune,
    query,
    score,
    select,
)
from sketchstore.atomic import write_text_atomic
from sketchstore.data import write_rows
from sketchstore.options import option
from sketchstore.spec import DEFAULT_DIM

from .tasks import generate_tasks
from .tiny_model import DEFAULT_MODEL_CACHE, ensure_warm_model

CHECKPOINT = "warm"
SEED_OFFSETS = {"pool": 11, "val": 12}  # disjoint generator seeds of the pool and the validation set


@dataclass(frozen=True)
class SketchDemoConfig:
    """The sketch-flow demo's sizes."""

    out: Path = option(Path("runs/sketch-demo"), "Output directory.")
    model_cache: Path = option(DEFAULT_MODEL_CACHE, "Where the warm-started demo policy is cached.")
    pool_size: int = option(400, "Prompts in the pool.")
    val_size: int = option(32, "Validation prompts (all of one family).")
    val_family: str = option("word", "The validation set's task family.")
    top: float = option(0.1, "Share of the pool selected.")
    dim: int = option(DEFAULT_DIM, "Sketch length k.")
    seed: int = option(0, "Seed of the generated tasks.")
    device: str = option("cpu", "cpu, cuda or cuda:N.")


def _share(rows: list[dict], family: str) -> float:
    return sum(r["family"] == family for r in rows) / max(len(rows), 1)


def _plot(path: Path, scores: dict[str, float], family_of: dict[str, str], cutoff: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for family in sorted(set(family_of.values())):
        ax.hist([s for i, s in scores.items() if family_of[i] == family], bins=30, alpha=0.6, label=family)
    ax.axvline(cutoff, color="black", linestyle="--", label="selection cut-off")
    ax.set_xlabel("influence score (mean cosine with validation sketches)")
    ax.set_ylabel("prompts")
    ax.set_title("Pool influence scores by task family")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_sketch_demo(config: SketchDemoConfig, log=print) -> dict:
    """Run the whole sketch flow; returns (and writes to ``out/report.json``) its figures."""
    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model = ensure_warm_model(config.model_cache, size="small", log=log)
    pool = generate_tasks(config.pool_size, seed=config.seed + SEED_OFFSETS["pool"], difficulty=range(1, 5))
    val = generate_tasks(config.val_size, seed=config.seed + SEED_OFFSETS["val"], difficulty=range(1, 5), families=[config.val_family])
    pool_path, val_path = write_rows(pool, out / "pool.jsonl"), write_rows(val, out / "val.jsonl")
    store_path = out / "store"
    spec = ProjectionSpec(dim=config.dim, seed=config.seed)
    for data, split in ((pool_path, "pool"), (val_path, "val")):
        report = build_sketches(BuildConfig(model=model, data=data, store=store_path, checkpoint=CHECKPOINT,
                                            split=split, spec=spec, device=config.device))
        log(f"built {split}: {report.added} new sketches, {report.skipped} reused ({report.rows_per_second:.1f} rows/s)")
    store = SketchStore.open(store_path, writable=True)
    train, vals = SplitRef(CHECKPOINT, "pool"), [SplitRef(CHECKPOINT, "val")]
    score(store, train, vals, ScoreOptions())
    chosen = select(store, train, vals, config.top)
    selection_path = export_selection(chosen, out / "selection.jsonl")
    kept, total = prune(pool_path, selection_path, out / "pool.pruned.jsonl")

    by_id = {r["id"]: r for r in pool}
    picked = [by_id[s.id] for s in chosen]
    rng = random.Random(config.seed)
    random_pick = rng.sample(pool, len(picked))
    _, rows = query(store, "SELECT id, score FROM scores")
    scores = dict(rows)
    cutoff = min(scores[s.id] for s in chosen)  # s.score is the fused (RRF) score, not the cosine
    _plot(out / "scores.png", scores, {i: r["family"] for i, r in by_id.items()}, cutoff)
    figures = {
        "pool": total, "selected": kept, "val_family": config.val_family,
        "val_family_share_pool": _share(pool, config.val_family),
        "val_family_share_selected": _share(picked, config.val_family),
        "val_family_share_random": _share(random_pick, config.val_family),
        "selected_difficulty": dict(sorted(Counter(r["difficulty"] for r in picked).items())),
        "seconds": time.perf_counter() - start,
        "model": str(model), "store": str(store_path),
    }
    write_text_atomic(out / "report.json", json.dumps(figures, indent=1))
    log(f"selected {kept} of {total} prompts -> {out / 'pool.pruned.jsonl'}")
    log(f"share of '{config.val_family}' prompts: pool {figures['val_family_share_pool']:.2f}, "
        f"influence selection {figures['val_family_share_selected']:.2f}, random {figures['val_family_share_random']:.2f}")
    log(f"plot: {out / 'scores.png'}; report: {out / 'report.json'}; try: sketch ls --store {store_path}")
    return figures
