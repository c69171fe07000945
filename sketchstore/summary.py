"""A human-readable summary of a store (what ``sketch ls`` prints)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .catalog import query
from .store import SketchStore


def format_table(columns: Sequence[str], rows: Sequence[Sequence], max_width: int = 48) -> str:
    """A plain aligned text table."""

    def cell(value) -> str:
        text = f"{value:.6g}" if isinstance(value, float) else str(value)
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe(store: SketchStore) -> str:
    spec = store.spec
    lines = [
        f"store      {store.path}",
        f"spec       dim={spec.dim} seed={spec.seed} mode={spec.mode} keep_ratio={spec.keep_ratio} "
        f"dtype={spec.dtype} param_hash={spec.param_hash or '-'}",
        f"storage    compressor={store.info.compressor} chunk_rows={store.info.chunk_rows}",
    ]
    _, rows = query(store, "SELECT checkpoint, split, count(*) AS rows, count(DISTINCT part) AS parts, "
                           "sum(CASE WHEN grad_norm = 0 THEN 1 ELSE 0 END) AS zero_grad "
                           "FROM sketches GROUP BY ALL ORDER BY ALL")
    if not rows:
        lines.append("(no sketches yet)")
        return "\n".join(lines)
    part_bytes = store.backend.part_bytes()
    _, part_rows = query(store, "SELECT checkpoint, split, part FROM sketches GROUP BY ALL")
    bytes_of: dict[tuple[str, str], int] = {}
    for ckpt, split, part in part_rows:
        bytes_of[(ckpt, split)] = bytes_of.get((ckpt, split), 0) + part_bytes.get(part, 0)
    table = [(c, s, n, p, z, f"{bytes_of[(c, s)] / max(n, 1):.0f}") for c, s, n, p, z in rows]
    lines.append(format_table(["checkpoint", "split", "rows", "parts", "zero_grad", "bytes/row"], table))
    return "\n".join(lines)
