"""Start a backbone from another run's weights (`algo.init_from`): the pre-training stage of FEAT and
the fine-tuning control that compares against it (ProtoNet or Matching Networks from the same weights,
with a fresh optimizer)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from metarun.checkpoint import load_checkpoint
from metarun.errors import UserInputError


def load_backbone(backbone: nn.Module, path: str) -> None:
    """Copy the backbone weights of a metarun checkpoint into `backbone` (weights_only load).

    Algorithms store their backbone as a submodule named `backbone` at some depth: `backbone.` in
    ProtoNet, MatchingNet and FEAT, `net.backbone.` in MAML. The shortest such prefix in the saved
    state dict is taken, so any algorithm following that naming works.
    """
    if not Path(path).expanduser().is_file():
        # A resumed run rebuilds the algorithm from its saved config: the file may be gone, and is not needed.
        raise UserInputError(f"algo.init_from={path}: file not found (to resume a run whose "
                             f"init checkpoint is gone, add algo.init_from=null: the weights are in its checkpoint)")
    state = load_checkpoint(path)
    model = state.get("model")
    if not isinstance(model, dict):
        raise UserInputError(f"algo.init_from={path}: the checkpoint holds no model weights")
    prefixes = {"backbone." if key.startswith("backbone.") else key[: key.index(".backbone.") + len(".backbone.")]
                for key in model if key.startswith("backbone.") or ".backbone." in key}
    if not prefixes:
        raise UserInputError(f"algo.init_from={path}: no backbone weights in that checkpoint (no key starts "
                             f"with 'backbone.' or '<module>.backbone.'); give a checkpoint of a run with a backbone")
    prefix = min(prefixes, key=len)
    weights = {key[len(prefix):]: value for key, value in model.items() if key.startswith(prefix)}
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as ex:
        detail = " ".join(str(ex).split())[:200]
        raise UserInputError(f"algo.init_from={path}: its backbone does not fit the configured model "
                             f"(train it with the same model.* settings): {detail}") from None
