"""Exceptions a user can meet; the CLI turns each into one line and exit status 2."""

from __future__ import annotations


class ProtobenchError(Exception):
    """Base class of every error that is the user's input or environment, not a bug."""


class ConfigError(ProtobenchError, ValueError):
    """A name, value or option the user gave is not allowed."""


class DataError(ProtobenchError):
    """A data set could not be provided."""


class DataUnavailableError(DataError):
    """No source could provide the data set; the message lists each source and why it failed."""


class DataIntegrityError(DataError):
    """A data file exists but is damaged; the message names the file and the repair command."""


class ResultsError(ProtobenchError):
    """The results folder or tracking store cannot be used."""


class SolveError(ProtobenchError, ArithmeticError):
    """A closed-form solve failed even after its float64 retry."""
