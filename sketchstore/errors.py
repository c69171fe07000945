"""Errors raised by sketchstore. Each message is one line that names the bad input."""


class UserError(Exception):
    """An error whose message names, on one line, what the user gave wrong: the commands print it and
    exit with code 2. Plugins (objectives found through the entry point) derive their errors from it."""


class SketchStoreError(UserError):
    """Base class of every error sketchstore raises on purpose."""


class BadInputError(SketchStoreError):
    """A data file, model or argument given by the user is missing or malformed."""


class SpecMismatchError(SketchStoreError):
    """Sketches or a model do not match the store's projection spec."""


class StoreNotFoundError(SketchStoreError):
    """A path is not a sketch store (or does not exist)."""


class UnknownKeyError(SketchStoreError):
    """A checkpoint, split or validation set is not in the store."""


class CorruptDataError(SketchStoreError):
    """A stored chunk or manifest failed its checksum or could not be decoded."""
