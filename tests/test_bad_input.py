"""Every bad input gets exit status 2 and one line naming the problem and the fix, never a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.cli_batch import run_in_one_process
from tests.conftest import run_metarun

CASES = {
    "unknown group option": (["algo=mamll"], "did you mean 'maml'"),
    "unknown key": (["trainer.stepz=3"], "did you mean 'trainer.steps'"),
    "unknown algo key": (["+algo.inner_lrr=0.1"], "did you mean 'inner_lr'"),
    "wrong type": (["trainer.steps=abc"], "trainer.steps"),
    "wrong type in algo": (["algo.inner_lr=fast"], "algo.inner_lr"),
    "zero shots": (["benchmark.shots=0"], "benchmark.shots must be a positive integer"),
    "negative steps": (["trainer.steps=-1"], "trainer.steps must be a non-negative integer"),
    "zero meta-batch": (["trainer.meta_batch_size=0"], "trainer.meta_batch_size"),
    "sweep without -m": (["seed=0,1"], "add -m"),
    "bad device": (["device=tpu"], "device must be one of"),
    "zero gradient clip": (["trainer.grad_clip_value=0"], "trainer.grad_clip_value must be positive or null"),
    "bad override syntax": (["trainer.steps=[1"], "cannot parse"),
}


# the first case in a process of its own, as a user runs it; the rest in one process (tests/cli_batch.py), which
# spares ~3 s of imports a case
IN_OWN_PROCESS = "unknown key"


@pytest.fixture(scope="module")
def batched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    work = tmp_path_factory.mktemp("bad_train_input")
    names = [name for name in CASES if name != IN_OWN_PROCESS]
    argvs = [["train", *CASES[name][0], "debug=smoke", f"hydra.run.dir={work / str(i)}"] for i, name in enumerate(names)]
    return dict(zip(names, run_in_one_process(argvs, cwd=work), strict=True))


@pytest.mark.parametrize("name", CASES)
def test_bad_train_input_is_one_line_exit_2(name: str, tmp_path: Path,
                                            batched: dict[str, subprocess.CompletedProcess[str]]) -> None:
    args, expected = CASES[name]
    if name == IN_OWN_PROCESS:
        proc = run_metarun("train", *args, "debug=smoke", f"hydra.run.dir={tmp_path}")
    else:
        proc = batched[name]
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize(
    "args,expected",
    [([], "needs ckpt_path"), (["ckpt_path=/does/not/exist.pt"], "checkpoint not found")],
)
def test_bad_eval_input_is_one_line_exit_2(args: list[str], expected: str) -> None:
    proc = run_metarun("eval", *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and expected in proc.stderr


def test_unknown_command() -> None:
    proc = run_metarun("trian")
    assert proc.returncode == 2 and "did you mean 'train'" in proc.stderr


def test_corrupt_checkpoint_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = run_metarun("eval", f"ckpt_path={bad}")
    assert proc.returncode == 2 and "cannot read checkpoint" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_malformed_yaml_in_a_user_config_dir(tmp_path: Path) -> None:
    (tmp_path / "algo").mkdir()
    (tmp_path / "algo" / "mine.yaml").write_text("_target_: metarun.algorithms.maml.MAML\ninner_lr: [0.1\n")
    proc = run_metarun("train", "--config-dir", str(tmp_path), "algo=mine", "debug=smoke")
    assert proc.returncode == 2 and "malformed YAML" in proc.stderr and "mine.yaml" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_a_user_config_dir_adds_options(tmp_path: Path) -> None:
    (tmp_path / "algo").mkdir()
    (tmp_path / "algo" / "mine.yaml").write_text("# mine\n_target_: metarun.algorithms.maml.MAML\ninner_lr: 0.1\n")
    proc = run_metarun("train", "--config-dir", str(tmp_path), "algo=mine", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "inner_lr: 0.1" in proc.stdout


@pytest.mark.parametrize("override,expected", [("benchmark=sinee", "did you mean 'sine'"),
                                               ("experiment=maml_sin", "did you mean 'maml_sine'"),
                                               ("trainer.eval_taskz=3", "did you mean 'trainer.eval_tasks'")])
def test_bad_eval_override_is_one_line_exit_2(smoke_run: Path, tmp_path: Path, override: str, expected: str) -> None:
    proc = run_metarun("eval", f"ckpt_path={smoke_run / 'checkpoints/best.pt'}", override, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and expected in proc.stderr, proc.stderr


def test_eval_checks_keys_against_the_checkpoints_own_groups(smoke_run: Path, tmp_path: Path) -> None:
    """A checkpoint trained with algo=protonet: a misspelt ProtoNet key on eval is named with ProtoNet's keys
    (eval composes the checkpoint's overrides first, as train composed them), not the default algorithm's."""
    import torch

    state = torch.load(smoke_run / "checkpoints" / "best.pt", weights_only=True)
    state["overrides"] = ["algo=protonet", "model=cnn", "benchmark=omniglot", "debug=smoke"]
    ckpt = tmp_path / "protonet" / "checkpoints" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save(state, ckpt)
    proc = run_metarun("eval", f"ckpt_path={ckpt}", "algo.distanse=cosine", f"hydra.run.dir={tmp_path / 'eval'}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "did you mean 'algo.distance'" in proc.stderr, proc.stderr


def test_ctrl_c_before_training_starts_is_one_line_exit_130(capsys: pytest.CaptureFixture[str]) -> None:
    """A KeyboardInterrupt while a run is being built (e.g. decoding a dataset) gets one line, not a traceback."""
    from metarun.cli import _guarded

    def task(cfg: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        _guarded(task)(None)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 130 and "\n" not in err and err.startswith("metarun: error: interrupted (Ctrl-C)")
