"""One family of errors: what a user did or got wrong, said in words the CLI prints as they are.

Every error the library raises on purpose for bad input, a bad reply or an unusable run folder
is a :class:`LiquidFedError`; ``liquid-fed`` prints its message (``liquid-fed: error: ...``) and
exits with status 2 instead of showing a traceback. Each subclass also derives from the
built-in exception it refines, so ``except ValueError`` keeps working for callers.
"""

from __future__ import annotations


class LiquidFedError(Exception):
    """Base class: a message for the user, naming the key, file, client or value at fault."""


class ConfigError(LiquidFedError, ValueError):
    """A configuration key or value that cannot be used."""


class DataError(LiquidFedError, ValueError):
    """A data file, data set option or id that cannot be used (names the file and key/row)."""


class RunFolderError(LiquidFedError, RuntimeError):
    """A run folder that cannot be used as asked (in use, would overwrite results, lacks a
    checkpoint, or holds a damaged one)."""


class ClientFailure(LiquidFedError, RuntimeError):
    """A client failed, sent a reply that does not pass the server's checks, or no reply."""
