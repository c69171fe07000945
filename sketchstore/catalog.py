"""DuckDB views over a store's manifests and scores.

``sketches``: one row per stored sketch: id, checkpoint, split, part, row, location (the
Zarr array holding it), grad_norm, sketch_norm, n_tokens, model_fingerprint and the
per-prompt metadata the builder had. ``scores``: one row per (train row, validation set,
metric, aggregation) score. The views read the Parquet files at query time and show exactly
the committed parts (on object storage: those committed when the connection was made).
Object storage is read through the store's fsspec filesystem, registered with DuckDB, so no
DuckDB extension has to be downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import duckdb

from .backend import PARTS_DIR, SCORES_DIR
from .errors import BadInputError

if TYPE_CHECKING:
    from .store import SketchStore

SKETCH_COLUMNS_WHEN_EMPTY = (
    "''::VARCHAR AS id, ''::VARCHAR AS checkpoint, ''::VARCHAR AS split, ''::VARCHAR AS part, 0::BIGINT AS row, "
    "''::VARCHAR AS location, 0.0::DOUBLE AS grad_norm, 0.0::DOUBLE AS sketch_norm, 0::BIGINT AS n_tokens, "
    "''::VARCHAR AS model_fingerprint")
VIEW_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RESERVED_VIEWS = ("sketches", "scores")
SCORE_COLUMNS_WHEN_EMPTY = (
    "''::VARCHAR AS id, ''::VARCHAR AS train_checkpoint, ''::VARCHAR AS train_split, ''::VARCHAR AS val_set, "
    "''::VARCHAR AS metric, ''::VARCHAR AS aggregation, ''::VARCHAR AS val_fingerprint, 0.0::DOUBLE AS score")


def quote_literal(text: str) -> str:
    """A SQL string literal for ``text``."""
    return "'" + text.replace("'", "''") + "'"


def quote_list(texts: Sequence[str]) -> str:
    """A SQL list literal of strings (``read_parquet`` takes one of paths or globs)."""
    return "[" + ", ".join(quote_literal(text) for text in texts) + "]"


def parquet_source(name: str, path: str | Path) -> str:
    """The ``read_parquet`` source of an extra view: a Parquet file, a directory of Parquet
    files (e.g. a `cropi rollout` trajectory store) or a glob."""
    if not VIEW_NAME.fullmatch(name) or name in RESERVED_VIEWS:
        raise BadInputError(f"bad view name {name!r}: use letters, digits and _, not {' or '.join(RESERVED_VIEWS)}")
    path = Path(path)
    if path.is_dir():
        if not any(path.glob("*.parquet")):
            raise BadInputError(f"view {name}: no Parquet files in {path}")
        return str(path / "*.parquet")
    if not path.is_file() and not any(path.parent.glob(path.name)):
        raise BadInputError(f"view {name}: no such Parquet file or directory: {path}")
    return str(path)


def connect(store: "SketchStore", tables: Mapping[str, str | Path] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the ``sketches`` and ``scores`` views of ``store``,
    plus one view per ``tables`` entry (name -> local Parquet file, directory or glob), e.g.
    ``{"trajectories": "traj.parquet"}`` to join rollouts with sketches and scores."""
    sources = {name: parquet_source(name, path) for name, path in (tables or {}).items()}
    con = store.backend.duckdb()
    for name, source in sources.items():
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({quote_literal(source)}, union_by_name = true)")
    parts_root = store.backend.location(PARTS_DIR)
    if store.part_names():
        con.execute(
            "CREATE VIEW sketches AS SELECT *, "
            f"{quote_literal(parts_root)} || '/' || part || '/sketches' AS location "
            f"FROM read_parquet({quote_list(store.manifest_sources())}, union_by_name = true)")
    else:
        con.execute(f"CREATE VIEW sketches AS SELECT {SKETCH_COLUMNS_WHEN_EMPTY} WHERE false")
    if store.score_files():
        scores = store.backend.location(f"{SCORES_DIR}/*/*.parquet")
        con.execute(f"CREATE VIEW scores AS SELECT * FROM read_parquet({quote_literal(scores)}, union_by_name = true)")
    else:
        con.execute(f"CREATE VIEW scores AS SELECT {SCORE_COLUMNS_WHEN_EMPTY} WHERE false")
    return con


def query(store: "SketchStore", sql: str,
          tables: Mapping[str, str | Path] | None = None) -> tuple[list[str], list[tuple]]:
    """Run ``sql`` against the store's views (and ``tables``, see :func:`connect`); returns
    (column names, rows)."""
    con = connect(store, tables)
    try:
        result = con.execute(sql)
    except duckdb.Error as err:
        first_line = str(err).strip().splitlines()[0]
        raise BadInputError(f"query failed: {first_line}") from err
    if result.description is None:
        return [], []
    return [d[0] for d in result.description], result.fetchall()
