"""One source for every default: the YAML tree. The Python API (a class called with no hyperparameters) and the
command line (`metarun train algo=X`) agree, and the schema holds types, never values."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from metarun.config import CALL_SITE_KEYWORDS, RunSchema, TrainerSchema, config_dir, validate
from metarun.defaults import option_defaults, option_node
from metarun.errors import UserInputError

ROOT = config_dir()
OPTIONS = sorted((p.parent.name, p.stem) for group in ("algo", "model", "benchmark") for p in (ROOT / group).glob("*.yaml"))


def _constructor_defaults(cls: type) -> dict[str, object]:
    return {name: p.default for name, p in inspect.signature(cls).parameters.items()
            if name not in CALL_SITE_KEYWORDS and name != "generator"}


def test_every_constructor_default_is_the_value_of_its_option_file() -> None:
    """Each class's signature defaults equal one option file's values, key for key (MatchingNet once said
    temperature 1.0 in Python and 0.1 in configs/algo/matching.yaml)."""
    by_class: dict[type, list[str]] = {}
    for group, option in OPTIONS:
        by_class.setdefault(get_class(option_node(group, option)._target_), []).append(f"{group}/{option}")
    for cls, options in by_class.items():
        signature = _constructor_defaults(cls)
        assert all(v is not inspect.Parameter.empty for v in signature.values()), f"{cls.__name__}: a hyperparameter without a default"
        matches = [o for o in options if dict(option_defaults(*o.split("/"))) == signature]
        assert matches, f"{cls.__name__}'s defaults {signature} match none of {options}"


def test_the_python_api_and_the_cli_agree_on_matching_networks_temperature() -> None:
    from metarun.algorithms.matching import MatchingNet

    assert inspect.signature(MatchingNet).parameters["temperature"].default == 0.1
    assert OmegaConf.load(ROOT / "algo" / "matching.yaml").temperature == 0.1


def test_the_trainer_schema_declares_exactly_the_keys_of_the_trainer_file_and_holds_no_values() -> None:
    fields = {f.name for f in dataclasses.fields(TrainerSchema)}
    trainer_file = OmegaConf.load(ROOT / "trainer" / "default.yaml")
    # the optimizer comes from its own group (configs/trainer/optimizer/, the file's defaults list)
    assert list(trainer_file.defaults) == [{"optimizer": "adam"}, "_self_"]
    assert fields == {*trainer_file.keys(), "optimizer"} - {"defaults"}
    for schema in (TrainerSchema, RunSchema):
        for f in dataclasses.fields(schema):
            # keys only some configs have (eval's split, predict's support/query/output, presets' figures); None = absent
            optional_key = f.name in ("split", "support", "query", "output", "paper", "reference")
            assert (f.default is dataclasses.MISSING) != optional_key, f"{schema.__name__}.{f.name} holds a value"


def test_a_config_missing_a_trainer_key_is_one_line_not_a_silent_default(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["~trainer.eval_every"])
    GlobalHydra.instance().clear()
    with pytest.raises(UserInputError, match=r"^config value\(s\) missing: trainer.eval_every"):
        validate(cfg)


@pytest.mark.parametrize("group, option", [("algo", "anil"), ("algo", "fomaml"), ("algo", "reptile")])
def test_option_nodes_follow_their_defaults_list_and_package(group: str, option: str) -> None:
    """A variant (anil = maml + adapt: head) and a `# @package _global_` file read as Hydra composes them."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"{group}={option}", "benchmark=omniglot"])
    GlobalHydra.instance().clear()
    composed = {k: v for k, v in OmegaConf.to_container(cfg[group]).items() if not k.startswith("_")}
    # the composed run may hold pair-file (algo_benchmark) settings on top; every other key is the option's own
    pair = ROOT / "algo_benchmark" / f"{option}_omniglot.yaml"
    overridden = set(OmegaConf.load(pair).get(group, {}).keys()) if pair.exists() else set()
    own = {k: (list(v) if isinstance(v, tuple) else v) for k, v in option_defaults(group, option).items()}
    assert {k: v for k, v in composed.items() if k not in overridden} == {k: v for k, v in own.items() if k not in overridden}
