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


class ParameterError(ConfigError):
    """A named parameter with a value that is not accepted.

    Its message is the library's wording (``solver must be one of [...], got "x"``); the config
    layer re-renders it with the dotted key (``ensemble.solver: got "x"; accepted: ...``), so a
    value is validated in one place and reported in the words of whoever passed it.

    Args:
        message: the library's message.
        name: the parameter's name.
        value: the value that arrived.
        choices: the accepted values, for a choice.
        interval: the accepted interval as text, e.g. ``(0, 1)``, for a number.
    """

    def __init__(self, message: str, name: str, value: object,
                 choices: tuple[str, ...] | list[str] | None = None,
                 interval: str | None = None) -> None:
        super().__init__(message)
        self.name, self.value, self.choices, self.interval = name, value, choices, interval

    def render(self, key: str) -> str:
        """The message in the config's words, for ``key`` (a dotted path)."""
        if self.choices is not None:
            return f'{key}: got "{self.value}"; accepted: {", ".join(self.choices)}'
        return f"{key}: got {self.value!r}; must lie in {self.interval}"


class DataError(LiquidFedError, ValueError):
    """A data file, data set option or id that cannot be used (names the file and key/row)."""


class RunFolderError(LiquidFedError, RuntimeError):
    """A run folder that cannot be used as asked (in use, would overwrite results, lacks a
    checkpoint, or holds a damaged one)."""


class RunFileError(RunFolderError, ValueError):
    """A file of a run folder that cannot be read as what it should be (damaged, not data)."""


class ClientFailure(LiquidFedError, RuntimeError):
    """A client failed, sent a reply that does not pass the server's checks, or no reply."""


class DeploymentError(RuntimeError):
    """A process of a deployment could not start, a run failed, or it did not finish in time.

    Not a :class:`LiquidFedError`: the input was fine, something at run time was not (the CLI
    exits 1, not 2). ``tag`` and ``ports`` name what the deployment used (all stopped and freed
    by then).
    """

    tag: str = ""
    ports: tuple[int, ...] = ()
