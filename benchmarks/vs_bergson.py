"""Factored sketches vs EleutherAI's Bergson (2.5.1), side by side on one CPU thread each.

Same models, same SFT rows, same sketch size (k = 8192 coordinates), exact gradients as the
reference. Bergson runs in its own virtual environment (created here on first use:
``.cache/bergson-venv``, no system site packages, torch 2.13.0 the CPU wheel, then
``pip install --no-deps bergson==2.5.1`` and the runtime dependencies below, one by one).

Per model (cropi.tiny_model sizes: ``tiny`` = 2 layers h64, ``small`` = 4 layers h256, both
tied-embedding Qwen2; ``smollm2`` = SmolLM2-135M-Instruct from ``.cache/models``, 30 layers
h576, on ``--smollm2-rows`` / ``--smollm2-val-rows`` rows so that a run takes minutes), on
``--rows`` train rows and ``--val-rows`` validation rows (cropi.tasks word problems with their
reference responses):

  exact          per-row gradients, unprojected (each tool's own objective: ours averages the
                 response's tokens incl. the end-of-turn tokens of the chat template, Bergson
                 only the assistant content; ours over all parameters or the linear weights,
                 Bergson over the linear modules it tracks)
  bergson p=P    ``bergson build --projection_dim P --loss_reduction mean``: per-module P x P
                 Rademacher Kronecker blocks, fp32; P swept, and the headline P has
                 P * P * modules ~ k
  ours LABEL     ``build_sketches`` (what ``sketch build`` runs) with factored or sparse specs
  bare           the floor of both: a frozen forward and input-gradient backward of our passes,
                 no hooks and no sketch (speed only)

Influence score of a train row = mean over validation rows of cos(g, v), the same function
for every method; fidelity = Spearman of the scores against the exact ones, and overlap of
the top-10% sets. Speed: ``rows/s compute`` = train rows / time of the gradient-and-sketch
loop over tokenised rows only (Bergson's ``collect_gradients``, our sketcher's
``sketch_batch``: tokenising is outside both); ``cpu`` the
same over that loop's process CPU time (one thread: robust to a busy machine); ``rows/s wall``
= train rows / wall time of the CLI command (``bergson build``, ``sketch build``: imports,
model load, tokenising, writing included). Bytes/row: on-disk size of the train output / rows.
Every configuration runs ``--repeats`` times, alternating tools; medians are reported, and the
speed-ups over Bergson (and fractions of bare) are paired per repeat (adjacent runs: drift cancels),
each median with a distribution-free confidence interval.

``--interleave ROUNDS`` adds the low-noise speed comparison: one process (our venv, Bergson
imported from its venv's site-packages: the same torch) builds the train rows with each
p of the sweep, each of our configurations and the bare passes in turn, ROUNDS rounds after an
untimed one; the runs of a round are seconds apart, so their ratios are paired at that distance
(the repeats' children run a minute or more apart, and the machine drifts 10-30% over minutes).

    .venv/bin/python benchmarks/vs_bergson.py                 # both models, 3 repeats
    .venv/bin/python benchmarks/vs_bergson.py --quick         # smoke run
    .venv/bin/python benchmarks/vs_bergson.py --models small,smollm2
    .venv/bin/python benchmarks/vs_bergson.py --models small --interleave 10

Ends with one JSON line; ``--plot`` writes the fidelity-vs-speed figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".cache" / "bergson-venv"
TORCH_PIN = "torch==2.13.0"
BERGSON_PIN = "bergson==2.5.1"
#: What ``import bergson`` and ``bergson build`` need besides torch, found by installing into an
#: empty venv until both ran (bergson's other declared requirements, torchvision, torchaudio and
#: bitsandbytes, are never imported by them; torch and transformers pinned as in the project).
BERGSON_DEPS = ("transformers==5.19.0", "datasets", "accelerate", "peft", "simple-parsing", "jaxtyping",
                "natsort", "ml_dtypes", "scipy", "pyyaml", "jinja2", "psutil", "petname", "torchopt")
MODELS = ("tiny", "small")
#: The real model option (not built: a local Hugging Face checkpoint).
SMOLLM2 = "smollm2"
SMOLLM2_DIR = ROOT / ".cache" / "models" / "smollm2-135m-instruct"
#: Our rows per forward/backward per model (SmolLM2's 49k-vocabulary logits make large passes slow;
#: on the 4-layer model 16 length-sorted rows per pass ran 75.6 rows/cpu-s against 62.5 at 32, whose
#: (32, 128, 128) block scratch leaves the core's cache, and 70.5 at 8: benchmarks/README.md).
OUR_BATCH = {"tiny": 32, "small": 16, SMOLLM2: 8}
#: Our configurations not run per model (sparse needs each row's full 135M gradient: minutes per run).
SKIP = {SMOLLM2: ("sparse",)}
DIM = 8192
TOP_FRACTION = 0.1
#: Coverage asked of the confidence interval of a median paired ratio (median_interval): 0.95
#: needs 6 repeats (range, 0.969); 9 give the 2nd smallest to 2nd largest (0.961).
MEDIAN_COVERAGE = 0.95
#: Glob of the linear weights (what Bergson tracks): our "linear layers only" runs.
LINEAR_GLOB = "model.layers.*proj.weight"
#: Our configurations: label -> (ProjectionSpec fields, BuildConfig fields). "factored" is the
#: default spec (block side 128 at k = 8192, factor_version 3) with exact norms (``--norms exact``);
#: "_sketch_norms" the same sketches with the build's default for factored, ``--norms sketch``
#: (blocks accumulated during backward); factored_sideS sweeps the block side (256 = the rule
#: before factor_side existed); factored_vV builds the factors by spec factor_version V (1: random
#: buckets, per parameter; 2: column factors shared per module; 3: folded buckets, the default);
#: factored_fp32_blocks is the default with float32 block products (``--block-dtype float32``; the
#: default, auto, multiplies in bfloat16 on CPUs with avx512_bf16).
OURS = {
    "factored": ({"mode": "factored"}, {"batch_size": 32, "norms": "exact"}),
    "factored_sketch_norms": ({"mode": "factored"}, {"batch_size": 32, "norms": "sketch"}),
    "factored_linear": ({"mode": "factored"}, {"batch_size": 32, "norms": "sketch", "params": (LINEAR_GLOB,)}),
    "sparse": ({"mode": "sparse"}, {"batch_size": 8}),
    **{f"factored_side{side}": ({"mode": "factored", "factor_side": side}, {"batch_size": 32, "norms": "sketch"})
       for side in (32, 64, 256)},
    **{f"factored_v{v}": ({"mode": "factored", "factor_version": v}, {"batch_size": 32, "norms": "sketch"})
       for v in (1, 2, 3)},
    "factored_fp32_blocks": ({"mode": "factored"}, {"batch_size": 32, "norms": "sketch", "block_dtype": "float32"}),
}
#: Bergson's projection_dim sweep per model; the first is the headline (p * p * modules ~ DIM).
BERGSON_P = {"tiny": (24, 12, 48), "small": (17, 8, 34), SMOLLM2: (6, 3, 12)}


# ------------------------------------------------------------------------------ shared helpers
def influence(train, val):
    """Mean cosine of each train row with the validation rows (numpy, float64)."""
    import numpy as np

    def unit(x):
        x = np.asarray(x, dtype=np.float64)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)

    return (unit(train) @ unit(val).mean(0)).tolist()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def read_ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in Path(path).read_text().splitlines() if line.strip()]


class Timer:
    """Wall and process CPU seconds accumulated over ``with`` blocks."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c


# ------------------------------------------------------------------------------ children
def build_splits(first: bool) -> tuple[str, ...]:
    """The splits a tool's child builds per configuration, in order; each build resets the timer,
    so the last (train) is the one timed. The child's first configuration builds train once more
    before, untimed: it warms the process up (without it Bergson's first p ran 1.5x slower than
    its third in a smoke run)."""
    return ("train",) * first + ("val", "train")


def child_exact(args) -> dict:
    """Exact influence scores of our SFT objective: all parameters and the linear weights only."""
    import fnmatch

    import torch

    from sketchstore.gradients import load_model, per_example_gradients, select_parameters
    from sketchstore.sft import SFTObjective

    model, tok = load_model(args.model)
    params = select_parameters(model)
    objective = SFTObjective(tok)
    linear = [n for n, _ in params if fnmatch.fnmatchcase(n, LINEAR_GLOB)]
    sets = {"all": [n for n, _ in params], "linear": linear}

    def flats(path):
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        for item in per_example_gradients(model, objective, rows, params):
            yield {key: torch.cat([item.grads[n].flatten() for n in names]).double() for key, names in sets.items()}

    target = {key: None for key in sets}
    for flat in flats(args.val):
        for key, vec in flat.items():
            vec = vec / vec.norm()
            target[key] = vec if target[key] is None else target[key] + vec
    scores = {key: [] for key in sets}
    for flat in flats(args.train):
        for key, vec in flat.items():
            scores[key].append(float(vec @ target[key] / vec.norm() / args.val_rows))
    return {"scores": scores, "n_params": {key: sum(dict(params)[n].numel() for n in names) for key, names in sets.items()}}


def _bergson_config(args, data: Path, run: Path, p: int):
    from bergson.config.config import DataConfig, IndexConfig

    return IndexConfig(run_path=str(run), model=str(args.model), precision="fp32", overwrite=True,
                       data=DataConfig(dataset=str(data), prompt_column="prompt", completion_column="response"),
                       projection_dim=p, loss_reduction="mean", token_batch_size=args.token_batch)


def time_bergson(timer: "Timer") -> None:
    """Time Bergson's gradient loop (bergson.build.collect_gradients) with ``timer`` from now on."""
    import bergson.build as bbuild

    collect = bbuild.collect_gradients

    def timed(*a, **k):
        with timer:
            return collect(*a, **k)

    bbuild.collect_gradients = timed


def build_bergson(args, data: Path, run: Path, p: int) -> None:
    """Bergson's build (its Python entry point, bergson.build.build) of ``data`` at projection_dim p into ``run``."""
    import bergson.build as bbuild
    from bergson.config.config import PreprocessConfig

    shutil.rmtree(run, ignore_errors=True)
    bbuild.build(_bergson_config(args, data, run, p), PreprocessConfig())


def child_bergson(args) -> dict:
    """Bergson's build per projection_dim; the gradient loop (collect_gradients) is timed."""
    from bergson import load_gradients

    timer = Timer()
    time_bergson(timer)
    out = {}
    work = Path(args.work)
    ps = [int(x) for x in args.ps.split(",")]
    for p in ps:
        grads = {}
        for split in build_splits(first=p == ps[0]):
            run = work / f"bergson-p{p}-{split}"
            timer.wall = timer.cpu = 0.0
            build_bergson(args, Path(getattr(args, split)), run, p)
            grads[split] = load_gradients(run)
        out[f"p{p}"] = {"scores": influence(grads["train"], grads["val"]), "compute_s": timer.wall,
                        "cpu_s": timer.cpu, "width": int(grads["train"].shape[1]),
                        "bytes_per_row": dir_bytes(work / f"bergson-p{p}-train") / len(grads["train"])}
    return out


def child_bergson_exact(args) -> dict:
    """Exact influence scores of Bergson's objective: its own tokenisation and labels
    (bergson.data.tokenize), loss = mean over labelled tokens, gradients of the modules it
    tracks (the keys of a built index's grad_sizes), one backward per row."""
    import torch
    from bergson.config.config import DataConfig
    from bergson.data import tokenize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    modules = list(json.loads((Path(args.index) / "info.json").read_text())["grad_sizes"])
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    weights = [model.base_model.get_submodule(m).weight for m in modules]
    cfg = DataConfig(dataset="", prompt_column="prompt", completion_column="response")

    def flats(path):
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        enc = tokenize({"prompt": [r["prompt"] for r in rows], "response": [r["response"] for r in rows]},
                       args=cfg, tokenizer=tok)
        for ids, labels in zip(enc["input_ids"], enc["labels"]):
            x, y = torch.tensor([ids]), torch.tensor([labels])
            logits = model(x).logits[:, :-1]
            mask = y[:, 1:] != -100
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].flatten(),
                                                     reduction="sum") / mask.sum()
            yield torch.cat([g.flatten() for g in torch.autograd.grad(loss, weights)]).double()

    target = None
    for vec in flats(args.val):
        target = vec / vec.norm() if target is None else target + vec / vec.norm()
    return {"scores": [float(v @ target / v.norm() / args.val_rows) for v in flats(args.train)],
            "n_params": sum(w.numel() for w in weights)}


def time_our_sketchers(timer: "Timer") -> None:
    """Time every sketcher build_sketches makes from now on with ``timer``: its sketch_batch
    (forward, backward and sketching of tokenised rows: the scope of Bergson's collect_gradients,
    whose rows are tokenised before it starts); the per-row sparse sketcher has no batched form
    and its sketch_rows (tokenising included) is timed."""
    import sketchstore.build as sbuild

    make = sbuild.make_sketcher

    def timed_sketcher(*a, **k):
        sketcher = make(*a, **k)
        method = "sketch_batch" if hasattr(sketcher, "sketch_batch") else "sketch_rows"  # sparse: per row
        inner = getattr(sketcher, method)

        def timed(*aa, **kk):
            with timer:
                return inner(*aa, **kk)

        setattr(sketcher, method, timed)
        return sketcher

    sbuild.make_sketcher = timed_sketcher


def build_ours(args, label: str, split: str, store: Path) -> None:
    """Our build (build_sketches, what `sketch build` runs) of configuration ``label`` (OURS) of
    ``split`` into ``store``, with ``args.batch`` rows per pass when given."""
    from sketchstore import BuildConfig, ProjectionSpec, build_sketches

    spec_fields, build_fields = OURS[label]
    build_fields = {**build_fields, "batch_size": build_fields["batch_size"] if args.batch is None else int(args.batch)}
    shutil.rmtree(store, ignore_errors=True)
    build_sketches(BuildConfig(model=Path(args.model), data=Path(getattr(args, split)), store=store, checkpoint="c",
                               split=split, spec=ProjectionSpec(dim=args.dim, **spec_fields), **build_fields),
                   progress=False)


def child_ours(args) -> dict:
    """Our builds, one per configuration, timed by :func:`time_our_sketchers`."""
    import numpy as np

    from sketchstore import SketchStore

    timer = Timer()
    time_our_sketchers(timer)
    work = Path(args.work)
    out = {}
    labels = args.configs.split(",")
    for label in labels:
        got = {}
        for split in build_splits(first=label == labels[0]):
            store = work / f"ours-{label}-{split}"
            timer.wall = timer.cpu = 0.0
            build_ours(args, label, split, store)
            ids, rows = SketchStore.open(store).read("c", split, ids=read_ids(getattr(args, split)))
            got[split] = rows.float().numpy().astype(np.float64)
        out[label] = {"scores": influence(got["train"], got["val"]), "compute_s": timer.wall, "cpu_s": timer.cpu,
                      "bytes_per_row": dir_bytes(work / f"ours-{label}-train") / len(got["train"])}
    return out


def bare_runner(args, timer: "Timer"):
    """The floor of both tools: a frozen forward and input-gradient backward of our passes (our
    loss at the loss tokens, the embedding's output as the leaf), no hooks, no sketch; returns
    the function that runs them once, timed by ``timer`` (on its own copy of the model)."""
    import torch

    from sketchstore.build import DEFAULT_FLUSH_ROWS
    from sketchstore.factored import SORT_ROWS, _frozen, batch_passes
    from sketchstore.gradients import load_model
    from sketchstore.sft import SFTObjective

    model, tok = load_model(args.model)
    objective = SFTObjective(tok)
    rows = [json.loads(line) for line in Path(args.train).read_text().splitlines() if line.strip()]
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.detach().requires_grad_(True))
    window = min(DEFAULT_FLUSH_ROWS, SORT_ROWS)  # the build's batches with --norms sketch (one SFT sequence per row)

    def run_passes() -> None:
        with _frozen(model), torch.enable_grad():
            for lo in range(0, len(rows), window):
                batch = objective.batch(rows[lo:lo + window])
                with timer:
                    for index in batch_passes(batch, int(args.batch)):
                        ids, mask = batch.padded(index)
                        logits = model(input_ids=ids, attention_mask=mask).logits
                        batch.loss_fn(batch.token_logits(logits, index), index).sum().backward()

    return run_passes


def child_bare(args) -> dict:
    """The bare passes (:func:`bare_runner`), timed after one untimed run (as build_splits warms up the other children)."""
    timer = Timer()
    run_passes = bare_runner(args, timer)
    run_passes()
    timer.wall = timer.cpu = 0.0
    run_passes()
    return {"compute_s": timer.wall, "cpu_s": timer.cpu}


def site_packages(venv: Path) -> Path:
    """The site-packages directory of a virtual environment."""
    return next((Path(venv) / "lib").glob("python*/site-packages"))


def child_interleaved(args) -> dict:
    """Bergson's builds (each p of ``args.ps``), our configurations' builds and the bare passes, in turn
    in this one process for ``args.rounds`` rounds after one untimed round: the runs of a round
    are seconds apart, so the machine's drift (10-30% over minutes here) cancels in per-round
    ratios. Bergson is imported from its own venv's site-packages, appended after ours, so both
    run on this venv's torch (2.13.0+cpu, the version of Bergson's venv; its p=17 index built here
    was bit-identical to the one built in its venv). Timed scopes as in the other children
    (Bergson's collect_gradients, our sketch_batch); only the train split is built."""
    sys.path.append(str(site_packages(Path(args.venv))))
    timer = Timer()
    time_bergson(timer)
    time_our_sketchers(timer)
    work = Path(args.work)

    def bergson(p: int):
        return lambda: build_bergson(args, Path(args.train), work / f"interleaved-bergson-p{p}", p)

    def ours(label: str):
        return lambda: build_ours(args, label, "train", work / f"interleaved-{label}")

    runs = {**{f"bergson_p{p}": bergson(int(p)) for p in args.ps.split(",")},
            **{label: ours(label) for label in args.configs.split(",")},
            "bare": bare_runner(args, timer)}
    cpu = {name: [] for name in runs}
    for round_ in range(int(args.rounds) + 1):
        for name, run in runs.items():
            timer.wall = timer.cpu = 0.0
            run()
            if round_:  # round 0 warms every run up, untimed
                cpu[name].append(timer.cpu)
    return {"cpu_s": cpu}


CHILDREN = {"exact": child_exact, "bergson": child_bergson, "bergson_exact": child_bergson_exact, "ours": child_ours,
            "bare": child_bare, "interleaved": child_interleaved}


# ------------------------------------------------------------------------------ parent
def ensure_venv(venv: Path) -> Path:
    """Bergson's own virtual environment; created (once) with pip, package by package."""
    python = venv / "bin" / "python"
    stamp = venv / ".bergson-installed"
    if stamp.is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    for step in ([TORCH_PIN], ["--no-deps", BERGSON_PIN], *[[d] for d in BERGSON_DEPS]):
        print(f"[venv] pip install {' '.join(step)}", flush=True)
        subprocess.run(pip + step, check=True)
    probe = "import torch, bergson.build; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
    subprocess.run([str(python), "-c", probe], check=True)
    stamp.write_text(" ".join([TORCH_PIN, BERGSON_PIN, *BERGSON_DEPS]) + "\n")
    return python


def thread_env(threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return env


def run_child(python: Path, args, task: str, **extra) -> dict:
    cmd = [str(python), __file__, "--child", task, "--threads", str(args.threads), "--dim", str(args.dim),
           "--token-batch", str(args.token_batch), "--val-rows", str(args.val_rows)]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(args.threads))
    if proc.returncode != 0:
        raise RuntimeError(f"child {task} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def timed_command(cmd: list[str], threads: int) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    def rank(x):
        order = np.argsort(np.asarray(x, dtype=np.float64), kind="stable")
        ranks = np.empty(len(x))
        ranks[order] = np.arange(len(x))
        return ranks

    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def top_overlap(a: list[float], b: list[float]) -> float:
    n = max(1, round(TOP_FRACTION * len(a)))
    top = lambda s: set(sorted(range(len(s)), key=lambda i: -s[i])[:n])
    return len(top(a) & top(b)) / n


def summarise(runs: list[dict], exact: list[float], rows: int) -> dict:
    """Median speed over repeats, fidelity of the first repeat (projections are seeded: equal)."""
    first = runs[0]
    return {"spearman": round(spearman(first["scores"], exact), 4), "top10": round(top_overlap(first["scores"], exact), 3),
            "rows_per_s_compute": round(statistics.median(rows / r["compute_s"] for r in runs), 2),
            "rows_per_s_cpu": round(statistics.median(rows / r["cpu_s"] for r in runs), 2),
            "bytes_per_row": round(first["bytes_per_row"])}


def median_interval(values: list[float], coverage: float = MEDIAN_COVERAGE) -> tuple[float, float, float]:
    """Distribution-free confidence interval of the median of ``values``: the order statistics
    x_(j) and x_(n+1-j) with the largest j whose coverage 1 - 2 P(Bin(n, 1/2) < j) is at least
    ``coverage`` (j = 1, the range, when n is too small); returns (low, high, its coverage)."""
    x, n = sorted(values), len(values)
    below = lambda j: sum(math.comb(n, i) for i in range(j)) / 2 ** n  # P(Bin(n, 1/2) < j)
    j = max([j for j in range(1, (n + 1) // 2 + 1) if 1 - 2 * below(j) >= coverage], default=1)
    return x[j - 1], x[n - j], 1 - 2 * below(j)


def paired_ratios(baseline: list[float], ours: list[float]) -> dict:
    """baseline / ours CPU seconds of each repeat (runs of one repeat are adjacent in time, so
    the machine's drift between repeats, 10-30% here, cancels): median with its distribution-free
    confidence interval (:func:`median_interval`), min, max, and the ratio of each side's fastest
    run (best of n, as timeit reports: interference only ever adds time)."""
    ratios = [b / o for b, o in zip(baseline, ours)]
    low, high, coverage = median_interval(ratios)
    return {"median": round(statistics.median(ratios), 3), "ci_low": round(low, 3), "ci_high": round(high, 3),
            "ci_coverage": round(coverage, 3), "min": round(min(ratios), 3), "max": round(max(ratios), 3),
            "best_of_n": round(min(baseline) / min(ours), 3), "each": [round(x, 3) for x in ratios]}


def prepare(work: Path, size: str, rows: int, val_rows: int) -> tuple[Path, Path, Path]:
    sys.path.insert(0, str(ROOT))
    from cropi.tasks import generate_tasks
    from cropi.tiny_model import build_tiny_model
    from sketchstore.data import write_rows

    model = SMOLLM2_DIR if size == SMOLLM2 else build_tiny_model(work / f"model-{size}", size=size, seed=0)
    train = write_rows(generate_tasks(rows, seed=1), work / "train.jsonl")
    val = write_rows(generate_tasks(val_rows, seed=2), work / "val.jsonl")
    return model, Path(train), Path(val)


def bench_model(args, bergson_py: Path, size: str, root: Path) -> dict:
    work = root / size
    work.mkdir(parents=True, exist_ok=True)
    if size == SMOLLM2:
        args = argparse.Namespace(**{**vars(args), "rows": args.smollm2_rows, "val_rows": args.smollm2_val_rows})
    model, train, val = prepare(work, size, args.rows, args.val_rows)
    paths = dict(model=model, train=train, val=val, work=work)
    ps = BERGSON_P[size]
    configs = [c for c in args.ours.split(",") if c and c not in SKIP.get(size, ())]
    exact = run_child(Path(sys.executable), args, "exact", **paths)
    ours_runs, bergson_runs, bare_runs, walls = [], [], [], {"bergson": [], "ours_factored_sketch_norms": []}
    for rep in range(args.repeats):
        bare_runs.append(run_child(Path(sys.executable), args, "bare", batch=OUR_BATCH[size], **paths))
        bergson_runs.append(run_child(bergson_py, args, "bergson", ps=",".join(map(str, ps)), **paths))
        ours_runs.append(run_child(Path(sys.executable), args, "ours", configs=",".join(configs), batch=OUR_BATCH[size],
                                   **paths))
        run = work / "wall-bergson"
        walls["bergson"].append(timed_command(
            [str(bergson_py.parent / "bergson"), "build", str(run), "--model", str(model), "--dataset", str(train),
             "--prompt_column", "prompt", "--completion_column", "response", "--projection_dim", str(ps[0]),
             "--loss_reduction", "mean", "--precision", "fp32", "--token_batch_size", str(args.token_batch),
             "--overwrite"], args.threads))
        store = work / "wall-ours"
        shutil.rmtree(store, ignore_errors=True)
        walls["ours_factored_sketch_norms"].append(timed_command(
            [str(Path(sys.executable).parent / "sketch"), "build", "--model", str(model), "--data", str(train),
             "--store", str(store), "--checkpoint", "c", "--split", "train", "--dim", str(args.dim),
             "--projection", "factored", "--norms", "sketch", "--batch-size", str(OUR_BATCH[size])], args.threads))
        print(f"[{size}] repeat {rep + 1}/{args.repeats} done", flush=True)
    if args.interleave:
        interleaved = run_child(Path(sys.executable), args, "interleaved", ps=",".join(map(str, ps)), configs=",".join(configs),
                                batch=OUR_BATCH[size], rounds=args.interleave, venv=args.venv, **paths)["cpu_s"]
    bergson_exact = run_child(bergson_py, args, "bergson_exact", index=work / f"bergson-p{ps[0]}-train", **paths)
    result = {"rows": args.rows, "val_rows": args.val_rows, "params_all": exact["n_params"]["all"], "params_linear": exact["n_params"]["linear"],
              "params_bergson": bergson_exact["n_params"], "methods": {}}
    for p in ps:
        key = f"p{p}"
        result["methods"][f"bergson_{key}"] = {
            **summarise([r[key] for r in bergson_runs], bergson_exact["scores"], args.rows),
            "width": bergson_runs[0][key]["width"]}
    for label in configs:
        reference = exact["scores"]["linear" if "params" in OURS[label][1] else "all"]
        result["methods"][f"ours_{label}"] = summarise([r[label] for r in ours_runs], reference, args.rows)
    result["bare_forward_backward"] = {key: round(statistics.median(args.rows / r[field] for r in bare_runs), 2)
                                       for key, field in (("rows_per_s_compute", "compute_s"), ("rows_per_s_cpu", "cpu_s"))}
    headline = [r[f"p{ps[0]}"]["cpu_s"] for r in bergson_runs]
    result["paired_speedup"] = {label: paired_ratios(headline, [r[label]["cpu_s"] for r in ours_runs])
                                for label in configs}
    result["paired_vs_bare"] = {label: paired_ratios([r["cpu_s"] for r in bare_runs], [r[label]["cpu_s"] for r in ours_runs])
                                for label in configs}
    result["rows_per_s_wall"] = {k: round(statistics.median(args.rows / w for w in v), 2) for k, v in walls.items()}
    if args.interleave:
        result["interleaved"] = {
            "rounds": args.interleave,
            "rows_per_s_cpu": {name: round(args.rows / statistics.median(v), 2) for name, v in interleaved.items()},
            "speedup": {label: paired_ratios(interleaved[f"bergson_p{ps[0]}"], interleaved[label]) for label in configs},
            "vs_bare": {label: paired_ratios(interleaved["bare"], interleaved[label]) for label in configs}}
    for name, m in result["methods"].items():
        print(f"[{size}] {name:28s} spearman {m['spearman']:.4f} top10 {m['top10']:.2f}  compute "
              f"{m['rows_per_s_compute']:7.2f} rows/s (cpu {m['rows_per_s_cpu']:7.2f})  {m['bytes_per_row']:7d} B/row",
              flush=True)
    print(f"[{size}] bare forward/backward (no hooks, no sketch): {result['bare_forward_backward']}", flush=True)
    for label, r in result["paired_speedup"].items():
        print(f"[{size}] ours_{label} vs bergson_p{ps[0]}, per repeat (CPU s ratio): median {r['median']} "
              f"({r['ci_coverage']:.0%} CI {r['ci_low']}-{r['ci_high']}), range {r['min']}-{r['max']}, best of "
              f"{args.repeats} {r['best_of_n']}; of bare {result['paired_vs_bare'][label]['median']}", flush=True)
    print(f"[{size}] wall rows/s (CLI, import+load included): {result['rows_per_s_wall']}", flush=True)
    for label, r in result.get("interleaved", {}).get("speedup", {}).items():
        print(f"[{size}] interleaved, {args.interleave} rounds in one process: ours_{label} vs bergson_p{ps[0]} median "
              f"{r['median']} ({r['ci_coverage']:.0%} CI {r['ci_low']}-{r['ci_high']}), range {r['min']}-{r['max']}; "
              f"of bare {result['interleaved']['vs_bare'][label]['median']}; rows/cpu-s "
              f"{result['interleaved']['rows_per_s_cpu']}", flush=True)
    return result


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary["models"]), figsize=(6 * len(summary["models"]), 4.5))
    for ax, (size, res) in zip(axes if len(summary["models"]) > 1 else [axes], summary["models"].items()):
        interleaved = res.get("interleaved", {}).get("rows_per_s_cpu", {})  # the low-noise speeds, when run

        def speed(name: str, method: dict) -> float:
            return interleaved.get(name.removeprefix("ours_"), method["rows_per_s_cpu"]) if interleaved else method["rows_per_s_cpu"]

        for tool, marker in (("bergson", "s"), ("ours", "o")):
            pts = sorted((speed(name, m), m["spearman"], name) for name, m in res["methods"].items()
                         if name.startswith(tool + "_"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label="Bergson 2.5.1" if tool == "bergson" else "ours")
            for x, y, name in pts:
                ax.annotate(name.split("_", 1)[1], (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.axhline(0.99, color="grey", lw=0.5, ls="--")
        if "bare_forward_backward" in res:
            ax.axvline(interleaved.get("bare", res["bare_forward_backward"]["rows_per_s_cpu"]), color="black", lw=0.8,
                       ls=":", label="bare forward/backward (no sketch)")
        ax.set_xscale("log")
        ax.set_xlabel("rows/s (build compute, per CPU second, 1 thread" + (", interleaved)" if interleaved else ")"))
        ax.set_ylabel("Spearman of influence scores vs exact")
        name = "SmolLM2-135M" if size == SMOLLM2 else f"{size} Qwen2"
        ax.set_title(f"{name} ({res['params_all'] / 1e6:.1f}M params, {res['rows']} rows), k = {summary['dim']}")
        ax.legend(loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rows", type=int, default=256, help="train rows")
    parser.add_argument("--val-rows", type=int, default=32)
    parser.add_argument("--smollm2-rows", type=int, default=64, help="train rows of the smollm2 model")
    parser.add_argument("--smollm2-val-rows", type=int, default=8)
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--token-batch", type=int, default=1024, help="Bergson's --token_batch_size")
    parser.add_argument("--ours", default=",".join(OURS), help="our configurations (labels of OURS)")
    parser.add_argument("--venv", type=Path, default=VENV)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="write the fidelity-vs-speed figure here")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, few rows, one repeat")
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="also time Bergson's p sweep, our configurations and bare in turn in one process for "
                             "ROUNDS rounds (per-round paired ratios: the low-noise speed comparison)")
    for hidden in ("child", "model", "train", "val", "ps", "configs", "index", "batch", "rounds"):
        parser.add_argument(f"--{hidden}", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(CHILDREN[args.child](args)))
        return
    if args.quick:
        args.models, args.rows, args.val_rows, args.repeats = "tiny", 32, 8, 1
    bergson_py = ensure_venv(args.venv)
    with tempfile.TemporaryDirectory(prefix="vs-bergson-") as tmp:
        root = Path(args.work or tmp)
        start = time.perf_counter()
        summary = {"dim": args.dim, "rows": args.rows, "val_rows": args.val_rows, "threads": args.threads,
                   "repeats": args.repeats, "load_avg_start": os.getloadavg()[0], "models": {}}
        for size in args.models.split(","):
            summary["models"][size] = bench_model(args, bergson_py, size, root)
        summary["load_avg_end"] = os.getloadavg()[0]
        summary["total_s"] = round(time.perf_counter() - start, 1)
    if args.plot:
        plot(summary, args.plot)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
