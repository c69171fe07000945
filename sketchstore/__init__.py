"""sketchstore: gradient sketches on disk (Zarr v3), queryable with DuckDB, scored incrementally.

The public API, in data-flow order::

    ProjectionSpec                     how gradients become sketches
    Objective, register_objective      what a sketch is the gradient of (sft built in; plugins)
    BuildConfig, build_sketches        data -> gradients -> sketches -> store
    SketchStore, SketchBatch           the store itself (append, stream, read)
    connect, query                     DuckDB views ``sketches`` and ``scores``
    SplitRef, ScoreOptions, score      streaming, incremental influence scores
    select, export_selection, prune    selection and offline dataset pruning
"""

from .build import BuildConfig, BuildReport, build_sketches
from .catalog import connect, query
from .errors import BadInputError, CorruptDataError, SketchStoreError, SpecMismatchError, StoreNotFoundError, UnknownKeyError
from .objectives import Objective, objective_kinds, objective_options, register_objective
from .projection import make_projector
from .scoring import ScoreOptions, ScoreReport, SplitRef, load_scores, score
from .selection import Selected, export_selection, fuse, prune, select
from .spec import ProjectionSpec
from .store import SketchBatch, SketchStore

__all__ = [
    "ProjectionSpec", "Objective", "register_objective", "objective_kinds", "objective_options", "BuildConfig", "BuildReport", "build_sketches", "SketchStore", "SketchBatch", "connect",
    "query", "SplitRef", "ScoreOptions", "ScoreReport", "score", "load_scores", "select", "Selected", "fuse",
    "export_selection", "prune", "make_projector", "SketchStoreError", "BadInputError", "SpecMismatchError",
    "StoreNotFoundError", "UnknownKeyError", "CorruptDataError",
]
