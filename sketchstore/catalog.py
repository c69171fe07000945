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

from typing import TYPE_CHECKING, Sequence

import duckdb

from .backend import PARTS_DIR, SCORES_DIR
from .errors import BadInputError

if TYPE_CHECKING:
    from .store import SketchStore

SKETCH_COLUMNS_WHEN_EMPTY = (
    "''::VARCHAR AS id, ''::VARCHAR AS checkpoint, ''::VARCHAR AS split, ''::VARCHAR AS part, 0::BIGINT AS row, "
    "''::VARCHAR AS location, 0.0::DOUBLE AS grad_norm, 0.0::DOUBLE AS sketch_norm, 0::BIGINT AS n_tokens, "
    "''::VARCHAR AS model_fingerprint")
SCORE_COLUMNS_WHEN_EMPTY = (
    "''::VARCHAR AS id, ''::VARCHAR AS train_checkpoint, ''::VARCHAR AS train_split, ''::VARCHAR AS val_set, "
    "''::VARCHAR AS metric, ''::VARCHAR AS aggregation, ''::VARCHAR AS val_fingerprint, 0.0::DOUBLE AS score")


def quote_literal(text: str) -> str:
    """A SQL string literal for ``text``."""
    return "'" + text.replace("'", "''") + "'"


def quote_list(texts: Sequence[str]) -> str:
    """A SQL list literal of strings (``read_parquet`` takes one of paths or globs)."""
    return "[" + ", ".join(quote_literal(text) for text in texts) + "]"


def connect(store: "SketchStore") -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the ``sketches`` and ``scores`` views of ``store``."""
    con = store.backend.duckdb()
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


def query(store: "SketchStore", sql: str) -> tuple[list[str], list[tuple]]:
    """Run ``sql`` against the store's views; returns (column names, rows)."""
    con = connect(store)
    try:
        result = con.execute(sql)
    except duckdb.Error as err:
        first_line = str(err).strip().splitlines()[0]
        raise BadInputError(f"query failed: {first_line}") from err
    if result.description is None:
        return [], []
    return [d[0] for d in result.description], result.fetchall()
