"""Errors that mean "the user asked for something we cannot do": exit status 2, one line, no traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserInputError(Exception):
    """Bad config or data. The message is one line naming the problem and the fix."""

    exit_code = 2


def closest(word: str, options: Iterable[str]) -> str:
    """' (did you mean X?)' for the nearest option, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
