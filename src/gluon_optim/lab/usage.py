"""User errors of the command line: one line, ``gluon-optim <command>: error: --option: ...``.

Every check of a command's input raises :class:`UsageError` (or a ``ValueError`` the command
maps to its option) before anything trains; :class:`Parser` makes argparse's own errors one line
too (the usage text stays one ``--help`` away), exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["Parser", "UsageError", "print_error"]


class UsageError(ValueError):
    """Bad input to a command; ``option`` is the flag (or argument) it came from."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option

    def with_valid(self, valid: object) -> UsageError:
        """The same error with ``(valid: ...)`` appended."""
        return UsageError(self.option, f"{self} (valid: {valid})")


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line: ``<prog>: error: <what>``."""

    def error(self, message: str) -> NoReturn:
        # argparse says "argument --lr: invalid float value"; the option leads, as everywhere.
        text = message.removeprefix("argument ")
        self.exit(2, f"{self.prog}: error: {text}\n")


def print_error(command: str, option: str, message: str) -> int:
    """Print one error line for ``option`` of ``gluon-optim <command>``; the exit status, 2."""
    where = f"{option}: " if option else ""
    print(f"gluon-optim {command}: error: {where}{message}", file=sys.stderr)
    return 2
