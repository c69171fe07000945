"""Scoring throughput on a local Dask cluster (1, 2, 4 worker processes) vs the single-process path.

Writes N rows of k-dim sketches into a blosc-lz4 fp16 store (benchmarks/scoring.py's synthetic
rows and one 64-row validation set), reads it once so every run finds it in the page cache,
then scores all rows, repeatedly, single-process (``score``) and with ``score(..., executor=client)``
on LocalClusters of single-threaded worker processes; each run starts from a store with no
stored scores. Cluster start-up is timed apart; scoring rows/s includes task planning,
the workers' reads and decoding, gathering and writing the scores. CPU us/row is the CPU time
(user + system) of this process and of every worker process per row: on a shared machine it
moves much less with other jobs' load than wall time does. Every Dask run's scores are checked
against the single-process ones. Prints a table and one JSON line.

    python benchmarks/dask_scoring.py --rows 50000 --dim 8192 --workers 1,2,4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import psutil

from scoring import VAL_ROWS, write_store
from sketchstore import ScoreOptions, SketchStore, SplitRef, load_scores, score
from sketchstore.distributed import dask_client
from sketchstore.summary import dir_bytes

TRAIN = SplitRef("c0", "train")
VALS = [SplitRef("c0", "val")]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


def cluster_cpu_seconds(client) -> float:
    """CPU seconds of this process plus those of every Dask worker process."""
    return cpu_seconds() + (sum(client.run(cpu_seconds).values()) if client is not None else 0.0)


def timed_score(path: Path, client) -> tuple[float, float, dict[str, float]]:
    """Wall seconds and CPU seconds (this process + workers) to score every train row from scratch, and the scores."""
    shutil.rmtree(path / "scores")
    (path / "scores").mkdir()
    store = SketchStore.open(path, writable=True)
    cpu = cluster_cpu_seconds(client)
    start = time.perf_counter()
    report = score(store, TRAIN, VALS, ScoreOptions(), progress=False, executor=client)
    seconds = time.perf_counter() - start
    cpu = cluster_cpu_seconds(client) - cpu
    assert report.already_scored == 0
    return seconds, cpu, load_scores(store, TRAIN, VALS)[VALS[0]]


def max_difference(a: dict[str, float], b: dict[str, float]) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[key] - b[key]) for key in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--workers", default="1,2,4", help="Comma-separated numbers of Dask worker processes.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per configuration (the best is kept).")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sketch-dask-bench-"))
    path = workdir / "store"
    load_start = os.getloadavg()[0]
    write_s = write_store(path, args.rows, args.dim, "blosc-lz4")
    per_row = dir_bytes(path / "parts") / (args.rows + VAL_ROWS)
    for part in (path / "parts").rglob("*"):  # into the page cache: every run reads from memory
        if part.is_file():
            part.read_bytes()
    print(f"# {args.rows} rows x k={args.dim}, blosc-lz4 fp16, {per_row:.0f} bytes/row, written in {write_s:.1f} s; "
          f"{os.cpu_count()} CPUs, load avg {load_start:.2f}")

    runs = [timed_score(path, None) for _ in range(args.repeats)]
    single_s, single_cpu, reference = min(s for s, _, _ in runs), min(c for _, c, _ in runs), runs[0][2]
    results: dict = {"rows": args.rows, "dim": args.dim, "bytes_per_row": per_row, "cpus": os.cpu_count(),
                     "single_rows_per_s": args.rows / single_s, "single_seconds": single_s,
                     "single_cpu_us_per_row": 1e6 * single_cpu / args.rows, "dask": {}}
    print(f"{'path':<22}{'start s':>9}{'score s':>9}{'rows/s':>10}{'vs single':>11}{'CPU us/row':>12}{'max |diff|':>12}")
    print(f"{'single process':<22}{'-':>9}{single_s:>9.2f}{args.rows / single_s:>10.0f}{1.0:>11.2f}"
          f"{1e6 * single_cpu / args.rows:>12.1f}{'-':>12}")
    for workers in (int(w) for w in args.workers.split(",")):
        start = time.perf_counter()
        with dask_client(workers=workers) as client:
            started = time.perf_counter() - start
            runs = [timed_score(path, client) for _ in range(args.repeats)]
        seconds, cpu = min(s for s, _, _ in runs), min(c for _, c, _ in runs)
        diff = max(max_difference(reference, scores) for _, _, scores in runs)
        rate = args.rows / seconds
        print(f"{f'dask, {workers} workers':<22}{started:>9.1f}{seconds:>9.2f}{rate:>10.0f}"
              f"{rate / results['single_rows_per_s']:>11.2f}{1e6 * cpu / args.rows:>12.1f}{diff:>12.1e}")
        results["dask"][str(workers)] = {"rows_per_s": rate, "seconds": seconds, "start_s": started,
                                         "vs_single": rate / results["single_rows_per_s"],
                                         "cpu_us_per_row": 1e6 * cpu / args.rows, "max_abs_diff": diff}
    results["loadavg_start"], results["loadavg_end"] = load_start, os.getloadavg()[0]
    print(f"# load avg {load_start:.2f} -> {results['loadavg_end']:.2f}")
    shutil.rmtree(workdir)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
