"""The one-line checks every meta-RL benchmark makes of its options and of `sample`'s arguments."""

from __future__ import annotations

from metarun.benchmarks.base import SPLITS
from metarun.errors import UserInputError


def integer_at_least(key: str, value: object, minimum: int) -> int:
    """`value` as an int, or a UserInputError naming `key` (YAML gives 2.0 or "3" as easily as 3)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserInputError(f"{key} must be an integer of at least {minimum} (got {value!r})")
    return value


def check_sample(benchmark: str, split: str, ways: int | None, shots: int | None, queries: int | None) -> None:
    """A reinforcement benchmark's tasks have no episode shape: ways/shots/queries must be left unset."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    for key, value in (("ways", ways), ("shots", shots), ("queries", queries)):
        if value is not None:
            raise UserInputError(f"benchmark={benchmark} is reinforcement learning and has no episode shape, so "
                                 f"{key} cannot be set (got {key}={value}); its data come from rollouts")
