"""Errors caused by the user's input (values, files, data, checkpoints, devices), as opposed to
failures of the code: their message alone says what is wrong and where, so a command-line front
end prints it as one line, without a traceback."""
from typing import Any


class InputError(Exception):
    """Base of the errors a user's input causes."""


class InputValueError(InputError, ValueError):
    """A value, a file's contents, data or a checkpoint that cannot be used."""


class InputFileNotFoundError(InputError, FileNotFoundError):
    """A file or folder named by the user does not exist."""


class ParameterError(InputValueError):
    """A parameter's value cannot work.

    The message names the parameter as the library does (``backbone='resnet5' is not ...``);
    :meth:`as_flag` names it as the command line does (``--backbone resnet5 is not ...``).
    """

    def __init__(self, param: str, value: Any, reason: str):
        super().__init__(f"{param}={value!r} {reason}")
        self.param, self.value, self.reason = param, value, reason

    def as_flag(self, flag: str | None = None) -> str:
        """The message with the parameter named ``--<flag>`` (by default ``--<param>``)."""
        flag = f"--{flag or self.param}"
        if isinstance(self.value, bool):  # a switch: named alone, or as absent
            return f"{flag} {self.reason}" if self.value else f"without {flag}, {self.reason}"
        value = " ".join(map(str, self.value)) if isinstance(self.value, (list, tuple)) else self.value
        return f"{flag} {value} {self.reason}"


class MissingPathError(ParameterError, FileNotFoundError):
    """A parameter names a file or folder that does not exist (or lacks a part it needs)."""
