"""The ``sketch`` command: a thin layer over the sketchstore library, one call per command."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import click

from sketchstore import (
    BuildConfig,
    ProjectionSpec,
    ScoreOptions,
    SketchStore,
    SplitRef,
    build_sketches,
    export_selection,
    objective_kinds,
    objective_options,
    prune,
    query,
    score,
    select,
)
from sketchstore.data import ColumnMap
from sketchstore.distributed import scoring_executor
from sketchstore.errors import BadInputError
from sketchstore.scoring import AGGREGATIONS, METRICS
from sketchstore.selection import FUSIONS, parse_top, read_ids
from sketchstore.summary import describe, format_table

from .common import one_line_errors
from .options import flag_of, options_from, take

STORE = click.option("--store", "store_path", required=True,
                     help="Sketch store: a directory, or an object-storage URL such as s3://bucket/prefix.")
TRAIN = click.option("--train", required=True, help="Train rows as CHECKPOINT:SPLIT.")
VAL = click.option("--val", required=True, multiple=True,
                   help="Validation set as CHECKPOINT:SPLIT (repeatable; a comma-separated list also works).")
METRIC = click.option("--metric", type=click.Choice(METRICS), default="cosine", show_default=True)
AGGREGATION = click.option("--aggregation", type=click.Choice(AGGREGATIONS), default="mean", show_default=True,
                           help="mean of per-example scores, or score against the summed validation sketch.")


def _val_refs(values: tuple[str, ...]) -> list[SplitRef]:
    return [ref for value in values for ref in SplitRef.parse_list(value)]


def _parse_shard(text: str) -> tuple[int, int]:
    if text == "auto":
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if rank is None or world is None:
            raise BadInputError("--shard auto takes I/N from RANK and WORLD_SIZE (as torchrun sets them); they are not set")
        text = f"{rank}/{world}"
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit():
        raise BadInputError(f"--shard must look like I/N (e.g. 0/4), got {text!r}")
    return int(index), int(count)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Build, store, query and score gradient sketches."""


def _objective_options(func):
    """``--objective`` and the options of every registered objective kind (e.g. popi's --trajectories)."""
    kinds = objective_kinds()
    for cls in kinds.values():
        required = {f.name: None for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        func = options_from(cls, defaults=required)(func)
    return click.option("--objective", type=click.Choice(sorted(kinds)), default="sft", show_default=True,
                        help="What a sketch is the gradient of. " + " ".join(
                            f"{name}: {(cls.__doc__ or '').strip()}" for name, cls in sorted(kinds.items())))(func)


def _chosen_objective(name: str, values: dict):
    """The options of objective ``name`` from the flags; a flag of another objective is refused."""
    chosen = None
    for kind, cls in objective_kinds().items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        given = {k: values.pop(k) for k in list(values) if k in fields}
        if kind == name:
            chosen = objective_options(name, **{k: v for k, v in given.items() if v is not None})
            continue
        for k, v in given.items():
            if v is not None and v != fields[k].default:
                raise BadInputError(f"--{flag_of(fields[k])} is an option of the {kind} objective, not of {name}")
    return chosen


@main.command()
@options_from(BuildConfig, exclude=("spec", "objective", "shard", "columns"))
@options_from(ColumnMap)
@options_from(ProjectionSpec, exclude=("param_hash",))
@click.option("--shard", default="0/1", show_default=True,
              help="Build only shard I of N (disjoint by id); auto: I/N from RANK/WORLD_SIZE (torchrun).")
@_objective_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@one_line_errors
def build(shard, objective, quiet, **values) -> None:
    """Sketch per-row gradients of an objective (sft, popi, ...) into a store."""
    spec = take(ProjectionSpec, values)
    config = take(BuildConfig, values, spec=spec, columns=take(ColumnMap, values), shard=_parse_shard(shard),
                  objective=_chosen_objective(objective, values))
    report = build_sketches(config, progress=not quiet)
    click.echo(f"{config.checkpoint}:{config.split}: {report.added} rows added, {report.skipped} already stored, "
               f"{report.total} in input ({report.rows_per_second:.2f} rows/s)")


@main.command("score")
@STORE
@TRAIN
@VAL
@METRIC
@AGGREGATION
@click.option("--dask-scheduler", default=None,
              help="Score on this running Dask cluster (e.g. tcp://host:8786); its workers must read --store at the same path.")
@click.option("--dask-workers", type=int, default=None, help="Score on a local Dask cluster of N worker processes.")
@click.option("--threads", type=int, default=None, help="Score in a pool of N threads of this process.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@one_line_errors
def score_cmd(store_path, train, val, metric, aggregation, dask_scheduler, dask_workers, threads, quiet) -> None:
    """Score train rows against validation sets (only rows not scored yet)."""
    store = SketchStore.open(store_path, writable=True)
    with scoring_executor(threads, dask_scheduler, dask_workers) as executor:
        report = score(store, SplitRef.parse(train), _val_refs(val), ScoreOptions(metric, aggregation),
                       progress=not quiet, executor=executor)
    click.echo(f"{train}: {report.scored} rows scored, {report.already_scored} already scored "
               f"({report.rows_per_second:.0f} rows/s)")


@main.command("select")
@STORE
@TRAIN
@VAL
@click.option("--top", required=True, help="Fraction in (0, 1] (e.g. 0.1) or a row count (e.g. 500).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Selection file (.jsonl or .parquet).")
@METRIC
@AGGREGATION
@click.option("--fusion", type=click.Choice(FUSIONS), default="rrf", show_default=True, help="How validation sets combine.")
@click.option("--exclude", multiple=True, type=click.Path(path_type=Path), help="Files of ids to leave out (e.g. earlier stages' selections).")
@click.option("--score-missing/--no-score-missing", default=True, show_default=True, help="Score unscored rows first.")
@one_line_errors
def select_cmd(store_path, train, val, top, out, metric, aggregation, fusion, exclude, score_missing) -> None:
    """Select the top rows by influence and write them to a file."""
    store = SketchStore.open(store_path, writable=score_missing)
    train_ref, val_refs, options = SplitRef.parse(train), _val_refs(val), ScoreOptions(metric, aggregation)
    if score_missing:
        score(store, train_ref, val_refs, options, progress=False)
    excluded = [key for path in exclude for key in read_ids(path)]
    selected = select(store, train_ref, val_refs, parse_top(top), options, fusion, excluded)
    export_selection(selected, out)
    click.echo(f"selected {len(selected)} rows of {train} -> {out}")


@main.command("prune")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Original dataset (.jsonl or .parquet).")
@click.option("--keep", required=True, type=click.Path(path_type=Path), help="File with the ids to keep (e.g. a selection).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Pruned dataset to write.")
@one_line_errors
def prune_cmd(data, keep, out) -> None:
    """Write the kept subset of a dataset, every column and the original order preserved."""
    kept, total = prune(data, keep, out)
    click.echo(f"kept {kept} of {total} rows -> {out}")


@main.command("ls")
@STORE
@one_line_errors
def ls_cmd(store_path) -> None:
    """What is stored: spec, checkpoints, splits, rows, parts, bytes."""
    click.echo(describe(SketchStore.open(store_path)))


@main.command("query")
@STORE
@click.argument("sql")
@click.option("--max-rows", default=50, show_default=True, help="Rows printed (all are computed).")
@click.option("--table", "tables", multiple=True, metavar="NAME=PATH",
              help="Extra view over a Parquet file, directory or glob, e.g. trajectories=traj.parquet (repeatable).")
@one_line_errors
def query_cmd(store_path, sql, max_rows, tables) -> None:
    """Run SQL over the views ``sketches`` and ``scores`` (and any --table views)."""
    extra = {}
    for item in tables:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise BadInputError(f"--table wants NAME=PATH, got {item!r}")
        extra[name] = path
    columns, rows = query(SketchStore.open(store_path), sql, extra)
    if columns:
        click.echo(format_table(columns, rows[:max_rows]))
        if len(rows) > max_rows:
            click.echo(f"... {len(rows) - max_rows} more rows")


@main.command("verify")
@STORE
@one_line_errors
def verify_cmd(store_path) -> None:
    """Read every chunk of every part and report all damage (changes nothing). Exit 1 if damaged."""
    from sketchstore.verify import stale_staging, verify

    store = SketchStore.open(store_path)
    problems = verify(store, progress=True)
    for problem in problems:
        click.echo(f"damaged: {problem}")
    leftovers = stale_staging(store)
    if leftovers:
        click.echo(f"{len(leftovers)} interrupted writes in .staging (harmless; `sketch repair` removes them)")
    click.echo(f"{len(store.part_names())} parts checked, {len(problems)} problems")
    if problems:
        raise SystemExit(1)


@main.command("repair")
@STORE
@one_line_errors
def repair_cmd(store_path) -> None:
    """Set damaged parts aside (to .quarantine/) so a re-run of `sketch build` rebuilds their rows."""
    from sketchstore.verify import repair

    moved = repair(SketchStore.open(store_path, writable=True))
    click.echo(f"{len(moved)} damaged parts moved to .quarantine/: {', '.join(moved) or '-'}")


if __name__ == "__main__":
    main()
