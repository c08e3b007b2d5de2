"""The one way metarun vmaps a model over tasks: `over_tasks(fn)` is torch.func.vmap with randomness="different".

torch.func.vmap refuses random operations by default (randomness="error"): a backbone with dropout or DropBlock
(model=resnet12) raises "vmap: called random operation while in randomness error mode" the first time it is
vmapped in training mode. With "different", every task draws its own masks, as a per-task loop would (with
"same", all tasks of a meta-batch would share one mask). The draws come from the global RNG, which run.py seeds
and every checkpoint saves, so a resumed run draws the same masks.

For deterministic functions the flag changes nothing (no random operation, nothing drawn: tests/test_golden.py
pins every algorithm's numbers), so every call site that vmaps a backbone or a functional_call of one goes
through here: the algorithms, and the Backbone protocol's default `forward_per_task`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.func import vmap


def over_tasks(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """torch.func.vmap(fn, randomness="different", **kwargs): `fn` mapped over a leading task dimension,
    each task with its own random draws (dropout masks)."""
    return vmap(fn, randomness="different", **kwargs)
