"""A training run's directory: its config, evaluation sets, JSONL log and checkpoints.

Files under the run directory::

    config.json           the TrainConfig (train rows replaced by their count)
    eval/<name>.jsonl     the evaluation sets as used
    log.jsonl             {"type": "step" | "eval" | "rollouts", ...} records, appended and flushed
    checkpoints/<name>/   HF model + tokenizer + trainer_state.pt/.json (+ pool.jsonl), written
                          atomically; checkpoints/LATEST names the newest

Resuming from a checkpoint truncates the log to what it held at that checkpoint; the tail is
kept in ``log.discarded.jsonl``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from sketchstore.atomic import atomic_dir, write_text_atomic

from .errors import BadConfigError
from .tasks import read_tasks, write_tasks

LOG_NAME = "log.jsonl"
DISCARDED_LOG_NAME = "log.discarded.jsonl"
CONFIG_NAME = "config.json"
EVAL_DIR = "eval"
CKPT_DIR = "checkpoints"
LATEST_NAME = "LATEST"
STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
POOL_NAME = "pool.jsonl"
PERIODIC_PREFIX = "step-"


def read_log(out: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of ``out/log.jsonl`` (a run directory or the file itself)."""
    p = Path(out)
    p = p / LOG_NAME if p.is_dir() else p
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest checkpoint directory of a run (``checkpoints/LATEST``), or None."""
    ck = Path(out) / CKPT_DIR
    try:
        name = (ck / LATEST_NAME).read_text().strip()
    except OSError:
        return None
    path = ck / name
    return path if (path / STATE_JSON).is_file() else None


class RunDir:
    """Reads and writes one run directory (see the module docstring)."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.log_path = self.out / LOG_NAME
        self.checkpoints = self.out / CKPT_DIR

    def holds_run(self) -> bool:
        return self.log_path.is_file() and self.log_path.stat().st_size > 0

    def append(self, record: dict[str, Any]) -> None:
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.is_file() else 0

    def truncate_log(self, offset: int) -> None:
        """Cut the log back to ``offset`` bytes, keeping the cut tail in log.discarded.jsonl."""
        if self.log_path.is_file() and self.log_path.stat().st_size > offset:
            with open(self.log_path, "rb+") as fh:
                fh.seek(offset)
                tail = fh.read()
                with open(self.out / DISCARDED_LOG_NAME, "ab") as d:
                    d.write(tail)
                fh.truncate(offset)

    def write_config(self, config: dict[str, Any]) -> None:
        write_text_atomic(self.out / CONFIG_NAME, json.dumps(config, indent=1) + "\n")

    def read_config(self) -> dict[str, Any]:
        try:
            return json.loads((self.out / CONFIG_NAME).read_text())
        except (OSError, ValueError):
            raise BadConfigError(f"{self.out}: no readable {CONFIG_NAME} (not a trainer run directory)") from None

    def write_eval_set(self, name: str, rows: list[dict[str, Any]]) -> None:
        write_tasks(rows, self.out / EVAL_DIR / f"{name}.jsonl")

    def read_eval_set(self, name: str) -> list[dict[str, Any]]:
        return read_tasks(self.out / EVAL_DIR / f"{name}.jsonl")

    def save_checkpoint(self, name: str, write_model: Callable[[Path], None], state: dict[str, Any],
                        blob: dict[str, Any], pool: list[dict[str, Any]] | None, keep_periodic: int) -> Path:
        """Write ``checkpoints/<name>`` atomically (replacing one of that name): the model (by
        ``write_model(dir)``), ``state`` (JSON, plus the log offset), ``blob`` (torch) and the
        prompt pool; then point LATEST at it and prune old periodic ones."""
        if not name or "/" in name or name.startswith(".") or name == LATEST_NAME:
            raise BadConfigError(f"bad checkpoint name {name!r}")
        final = self.checkpoints / name
        with atomic_dir(final, on_exists="replace") as tmp:
            write_model(tmp)
            if pool is not None:
                write_tasks(pool, tmp / POOL_NAME)
            torch.save(blob, tmp / STATE_PT)
            full = {"name": name, **state, "log_offset": self.log_size(), "pool_saved": pool is not None}
            (tmp / STATE_JSON).write_text(json.dumps(full, indent=1) + "\n")
        write_text_atomic(self.checkpoints / LATEST_NAME, name + "\n")
        self._prune_periodic(keep_periodic)
        return final

    @staticmethod
    def checkpoint_state(path: Path) -> dict[str, Any]:
        """The JSON state of a checkpoint (step, rollouts, eval set names, config, ...)."""
        return json.loads((path / STATE_JSON).read_text())

    def load_checkpoint(self, path: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]] | None]:
        """(state JSON, torch blob, pool rows or None) of a checkpoint."""
        state = self.checkpoint_state(path)
        blob = torch.load(path / STATE_PT, map_location="cpu", weights_only=False)
        pool = read_tasks(path / POOL_NAME) if state.get("pool_saved") else None
        return state, blob, pool

    def _prune_periodic(self, keep: int) -> None:
        periodic = []
        for p in self.checkpoints.iterdir():
            if p.name.startswith(PERIODIC_PREFIX) and p.name[len(PERIODIC_PREFIX):].isdigit() and p.is_dir():
                periodic.append((int(p.name[len(PERIODIC_PREFIX):]), p))
        periodic.sort()
        for _, p in periodic[: max(0, len(periodic) - keep)]:
            shutil.rmtree(p, ignore_errors=True)
