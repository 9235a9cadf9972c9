"""One exception hierarchy for the whole package.

Every error a user can provoke derives from :class:`RefModelError`; the subclasses also derive from
the matching builtin (``ValueError``, ``KeyError``, ...) so ``except ValueError`` keeps working.
Messages say what was wrong, what was expected, and how to fix it.
"""

from __future__ import annotations


class RefModelError(Exception):
    """Base class of every error raised by refmodel."""


class InvalidInput(RefModelError, ValueError):
    """An argument has the wrong shape, dtype, range or value."""


class InvalidBatch(InvalidInput):
    """A batch (ids, masks) is malformed: ragged, mismatched, out of vocabulary, empty or too long."""

    field: str  # declared only (no class value): set on instances that name the offending field


class ConfigError(InvalidInput):
    """A configuration or combination of options that cannot work together."""


class DataFormatError(InvalidInput):
    """A data file has a malformed record; the message names the file and the line."""


class FingerprintMismatch(RefModelError):
    """Stored or remote log-probs belong to another reference than the one asked for."""


class StoreCorrupt(RefModelError):
    """A store file failed its checksum or is structurally invalid."""


class StorageError(RefModelError, OSError):
    """Reading or writing a file failed (disk full, no permission, read-only filesystem).

    The message names the path and the cause; the store is left as it was before the write (the temp
    file is removed), so the same command can be rerun once the cause is fixed.
    """


class StoreMiss(RefModelError, KeyError):
    """The store holds no entry for these exact token ids."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "store miss"


class ModelNotAllowed(RefModelError, LookupError):
    """A model name that is not in the allow-list / registry."""


class MissingDependency(RefModelError, ImportError):
    """An optional extra is needed for this feature and is not installed."""


class ServiceError(RefModelError):
    """The reference service answered with an error status."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Unauthorized(ServiceError):
    """Missing or wrong bearer token (HTTP 401)."""


class ServiceOverloaded(ServiceError):
    """The service's queue is full (HTTP 429) or it is unavailable (HTTP 503) after all retries."""


class RequestTooLarge(ServiceError):
    """The request body exceeds the service's limit (HTTP 413)."""


__all__ = [
    "RefModelError",
    "InvalidInput",
    "InvalidBatch",
    "ConfigError",
    "DataFormatError",
    "FingerprintMismatch",
    "StoreCorrupt",
    "StorageError",
    "StoreMiss",
    "ModelNotAllowed",
    "MissingDependency",
    "ServiceError",
    "Unauthorized",
    "ServiceOverloaded",
    "RequestTooLarge",
]
