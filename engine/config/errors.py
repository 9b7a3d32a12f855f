"""Config errors: each names the file, the full dotted key and the fix, and prints as one line.

The subclasses let callers (and tests) tell the kinds apart; all are `ConfigError`, itself a `ValueError`.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config problem the user must fix: `file`, dotted `key` (e.g. "optim.lr"), what is wrong, the fix."""

    def __init__(self, file: str, key: str, message: str, fix: str = "") -> None:
        self.file = str(file)
        self.key = key
        self.message = message
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.file}: {self.key}: {self.message}"
        if self.fix:
            text += f"; fix: {self.fix}"
        # One line, always: the headless face prints it as the exit reason, the TUI under the form field.
        return " ".join(text.split())

    def __reduce__(self):  # keep picklable despite the custom __init__
        return (type(self), (self.file, self.key, self.message, self.fix))


class TomlSyntaxError(ConfigError):
    """The file is not valid TOML."""


class ExtendsError(ConfigError):
    """`extends` names a missing file, or the chain of `extends` loops."""


class UnknownKeyError(ConfigError):
    """A key the schema does not have (often a typo)."""


class WrongTypeError(ConfigError):
    """A value of the wrong TOML type (a string where a number belongs, ...)."""


class BadValueError(ConfigError):
    """A value of the right type outside its allowed set or range."""


class ConflictError(ConfigError):
    """Values that are each fine but impossible together (or with the dataset)."""
