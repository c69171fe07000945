"""Errors raised by cropi. Each message is one line that names the bad input; the ``cropi``
command prints it as ``error: ...`` and exits with code 2, as ``sketch`` does (for ``sketch build
--objective popi``) since CropiError is a sketchstore UserError."""

from sketchstore.errors import UserError


class CropiError(UserError):
    """Base class of every error cropi raises on purpose."""


class BadConfigError(CropiError, ValueError):
    """A setting, file or model given by the user is missing, malformed or out of range."""


class NoValidationSignalError(CropiError):
    """Every validation sketch at a checkpoint is zero: the behaviour samples agree on every
    validation prompt (all right or all wrong), so there is no validation gradient to align with."""
