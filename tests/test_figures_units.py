"""What the figures draw, without drawing: learning curves over seeds, labels, file names, bar axes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from metarun.errors import UserInputError
from metarun.figures.labels import figure_stem, short_labels
from metarun.figures.results_chart import value_axis_start
from metarun.figures.series import across_seeds, read_metrics, series_of
from metarun.report import Group, Run


def _rows(values: dict[int, float], key: str = "val/accuracy", seconds: float | None = None) -> list[dict]:
    return [{"step": s, key: v, **({"time": s * seconds} if seconds else {})} for s, v in values.items()]


def test_seeds_are_averaged_at_the_steps_all_of_them_logged() -> None:
    a = series_of(_rows({100: 0.5, 200: 0.7, 300: 0.8}), "val/accuracy")
    b = series_of(_rows({100: 0.7, 200: 0.9}), "val/accuracy")  # stopped earlier
    assert a is not None and b is not None
    band = across_seeds([a, b])
    assert band is not None and band.seeds == 2
    assert band.x.tolist() == [100, 200]
    assert np.allclose(band.mean, [0.6, 0.8]) and np.allclose(band.sd, [np.std([0.5, 0.7], ddof=1)] * 2)


def test_one_seed_has_no_band_and_time_is_the_mean_over_seeds() -> None:
    one = across_seeds([series_of(_rows({10: 1.0, 20: 2.0}), "val/accuracy")])  # type: ignore[list-item]
    assert one is not None and one.sd.tolist() == [0.0, 0.0]
    fast = series_of(_rows({10: 1.0, 20: 2.0}, seconds=1.0), "val/accuracy")
    slow = series_of(_rows({10: 1.0, 20: 2.0}, seconds=3.0), "val/accuracy")
    timed = across_seeds([fast, slow], x="time")  # type: ignore[list-item]
    assert timed is not None and timed.x.tolist() == [20.0, 40.0]
    untimed = series_of(_rows({10: 1.0}), "val/accuracy")
    assert across_seeds([fast, untimed], x="time") is None  # type: ignore[list-item]


def test_a_step_logged_twice_keeps_its_last_value_and_other_keys_are_ignored() -> None:
    rows = [{"step": 5, "train/loss": 2.0}, {"step": 5, "train/loss": 1.0}, {"step": 5, "val/mse": 9.0}]
    found = series_of(rows, "train/loss")
    assert found is not None and found.steps.tolist() == [5] and found.values.tolist() == [1.0]
    assert series_of(rows, "train/accuracy") is None


def test_metrics_jsonl_cut_off_last_line_is_dropped_and_bad_lines_are_errors(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"step": 1, "train/loss": 1.0}) + '\n{"step": 2, "tra')
    assert [r["step"] for r in read_metrics(log)] == [1]
    log.write_text('[1, 2]\n{"step": 1}\n')
    with pytest.raises(UserInputError, match="line 1 has no step"):
        read_metrics(log)


def _group(setting: str, algo: str, benchmark: str = "omniglot") -> Group:
    results = {"algo": algo, "model": "cnn", "benchmark": benchmark, "split": "test", "metric": "accuracy",
               "mean": 0.9, "ci95": 0.01}
    return Group(setting, "accuracy", [Run(Path("/r/results.json"), results, setting)])


def test_short_labels_keep_what_tells_settings_apart() -> None:
    groups = [_group("protonet/cnn/omniglot (test) benchmark.ways=20 trainer.steps=1000", "protonet"),
              _group("matching/cnn/omniglot (test) benchmark.ways=20 trainer.steps=1000", "matching"),
              _group("matching/cnn/omniglot (test) trainer.steps=1000", "matching")]
    assert short_labels(groups) == ["protonet benchmark.ways=20", "matching benchmark.ways=20", "matching"]
    assert short_labels(groups[:1]) == ["protonet/cnn/omniglot"]
    init = _group("protonet/cnn/omniglot (test) algo.init_from=/long/path/to/runs/a/checkpoints/best.pt", "protonet")
    assert short_labels([groups[0], init])[1] == "algo.init_from=…/checkpoints/best.pt"


def test_file_stems_are_short_safe_and_unique() -> None:
    long = "protonet/cnn/omniglot (test) trainer.steps=1000 trainer.eval_every=250 benchmark.ways="
    first, second = figure_stem("curves", long + "5"), figure_stem("curves", long + "20")
    assert first != second and first == figure_stem("curves", long + "5")  # deterministic, different settings differ
    assert len(first) <= len("curves-") + 48 + 9 and all(c.isalnum() or c == "-" for c in first)
    assert first.startswith("curves-protonet-cnn-omniglot-test-trainer-steps-1000")


def test_accuracy_bars_start_near_the_data_and_errors_at_zero() -> None:
    assert value_axis_start("accuracy", 93.0, 99.0) == 91.0
    assert 0 < value_axis_start("accuracy", 95.0, 95.2) < 95.0
    assert value_axis_start("accuracy", 15.0, 40.0) == 0.0  # near chance: from zero
    assert value_axis_start("mse", 0.2, 0.3) == 0.0


def test_paired_bins_follow_the_grid_of_possible_differences() -> None:
    from metarun.figures.paired import bin_edges

    rng = np.random.default_rng(0)
    steps = rng.integers(-10, 11, size=600)
    noisy = steps * (100 / 75) + rng.normal(0, 3e-6, size=600)  # float32 accuracies, differenced, in points
    edges = bin_edges(noisy, float(noisy.min()), float(noisy.max()))
    assert isinstance(edges, np.ndarray) and np.allclose(np.diff(edges), 100 / 75)
    counts, _ = np.histogram(noisy, edges)
    assert (counts > 0).sum() == len(np.unique(steps))  # each possible difference in a bin of its own
    assert bin_edges(rng.normal(size=600), -3.0, 3.0) == 30  # continuous differences (MSE): plain bins


def test_a_setting_whose_tasks_all_diverged_is_drawn_without_its_bar() -> None:
    pytest.importorskip("matplotlib")
    from metarun.figures.backend import load_matplotlib
    from metarun.figures.output import render
    from metarun.figures.results_chart import Bar, draw

    load_matplotlib()
    figure = draw("mse", [Bar("diverged", float("nan"), float("nan")), Bar("fine", 0.2, 0.02)])
    drawn = render(figure, "results-mse", "results", "mse", ("a", "b"), "")
    assert b"not finite" in drawn.svg and drawn.png.startswith(b"\x89PNG")
