"""Scoring throughput from a compressed on-disk store vs the same product in memory.

Writes N rows of k-dim sketches into a store (per compressor), then, in fresh subprocesses
so peak memory is measured per run, scores them by streaming (sketchstore.score) and by
numpy on the whole float32 matrix in memory. Prints a table and one JSON line.

    python benchmarks/scoring.py --rows 100000 --dim 8192
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sketchstore import ScoreOptions, SketchBatch, SketchStore, SplitRef, score
from sketchstore.spec import ProjectionSpec
from sketchstore.summary import dir_bytes

WRITE_BATCH = 4096
VAL_ROWS = 64


def rows_of(n: int, dim: int, seed: int) -> np.ndarray:
    # low-rank plus noise: sketches of real gradients share directions, which compression may exploit
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((16, dim)).astype(np.float32)
    return (rng.standard_normal((n, 16)).astype(np.float32) @ basis + rng.standard_normal((n, dim)).astype(np.float32))


def write_store(path: Path, rows: int, dim: int, compressor: str) -> float:
    store = SketchStore.create(path, ProjectionSpec(dim=dim), compressor=compressor)
    start = time.perf_counter()
    for lo in range(0, rows, WRITE_BATCH):
        n = min(WRITE_BATCH, rows - lo)
        x = torch.from_numpy(rows_of(n, dim, lo))
        store.append("c0", "train", SketchBatch([f"r{lo + i}" for i in range(n)], x, x.norm(dim=1).tolist(), [1] * n))
    x = torch.from_numpy(rows_of(VAL_ROWS, dim, 10**9))
    store.append("c0", "val", SketchBatch([f"v{i}" for i in range(VAL_ROWS)], x, x.norm(dim=1).tolist(), [1] * VAL_ROWS))
    return time.perf_counter() - start


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_stream(path: str) -> dict:
    store = SketchStore.open(path, writable=True)
    baseline = peak_rss_mb()
    start = time.perf_counter()
    report = score(store, SplitRef("c0", "train"), [SplitRef("c0", "val")], ScoreOptions(), progress=False)
    seconds = time.perf_counter() - start
    return {"rows": report.scored, "seconds": seconds, "rows_per_s": report.scored / seconds,
            "peak_rss_mb": peak_rss_mb(), "rss_before_mb": baseline}


def child_memory(rows: int, dim: int) -> dict:
    matrix = np.concatenate([rows_of(min(WRITE_BATCH, rows - lo), dim, lo) for lo in range(0, rows, WRITE_BATCH)])
    val = rows_of(VAL_ROWS, dim, 10**9)
    target = (val / np.linalg.norm(val, axis=1, keepdims=True)).mean(0)
    start = time.perf_counter()
    scores = (matrix @ target) / np.linalg.norm(matrix, axis=1)
    seconds = time.perf_counter() - start
    assert scores.shape == (rows,)
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "peak_rss_mb": peak_rss_mb()}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--compressors", default="blosc-lz4,zstd,none")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = child_stream(rest[0]) if kind == "stream" else child_memory(int(rest[0]), int(rest[1]))
        print(json.dumps(result))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sketch-bench-"))
    results = {"rows": args.rows, "dim": args.dim}
    memory = run_child("memory", str(args.rows), str(args.dim))
    print(f"in-memory numpy (float32 {args.rows}x{args.dim}): {memory['rows_per_s']:.0f} rows/s, "
          f"peak RSS {memory['peak_rss_mb']:.0f} MB")
    results["memory_rows_per_s"] = memory["rows_per_s"]
    results["memory_peak_rss_mb"] = memory["peak_rss_mb"]
    print(f"{'compressor':<12}{'write s':>9}{'bytes/row':>11}{'rows/s':>10}{'vs mem':>8}{'peak MB':>9}  small-store peak MB")
    for compressor in args.compressors.split(","):
        big, small = workdir / f"{compressor}-big", workdir / f"{compressor}-small"
        write_s = write_store(big, args.rows, args.dim, compressor)
        write_store(small, args.rows // 4, args.dim, compressor)
        per_row = dir_bytes(big / "parts") / (args.rows + VAL_ROWS)
        stream = run_child("stream", str(big))
        stream_small = run_child("stream", str(small))
        ratio = stream["rows_per_s"] / memory["rows_per_s"]
        print(f"{compressor:<12}{write_s:>9.1f}{per_row:>11.0f}{stream['rows_per_s']:>10.0f}{ratio:>8.2f}"
              f"{stream['peak_rss_mb']:>9.0f}  {stream_small['peak_rss_mb']:.0f} ({args.rows // 4} rows)")
        results[compressor] = {"bytes_per_row": per_row, "write_s": write_s, "rows_per_s": stream["rows_per_s"],
                               "ratio_vs_memory": ratio, "peak_rss_mb": stream["peak_rss_mb"],
                               "peak_rss_mb_quarter_rows": stream_small["peak_rss_mb"]}
        shutil.rmtree(big)
        shutil.rmtree(small)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
