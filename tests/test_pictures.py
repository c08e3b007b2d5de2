"""TensorBoard pictures: matplotlib figures with axes, legend and colour bar when it is installed, the
Pillow/torch rasters when it is not, matplotlib never imported by training itself, and the pictures
reaching the event file pixel for pixel."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

from metarun.algorithms.heatmap import _ticks, attention_map, heatmap
from metarun.loggers import TensorBoardLogger
from metarun.plotting import curve_plot, pillow_curve_plot, sine_fit

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed (pip install metarun[plot])")


def hide_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every `import matplotlib...` fail for the rest of the test, as on a machine without it."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def sine_inputs() -> tuple[np.ndarray, dict, dict]:
    x = np.linspace(-5, 5, 200)
    curves = {"before adaptation": (0.1 * x, (90, 90, 230)), "after 5 steps": (2 * np.sin(x - 1), (40, 170, 40))}
    px = np.array([-4.0, -1.0, 0.5, 3.0])
    points = {"support": (px, 2 * np.sin(px - 1), (220, 40, 40))}
    return x, curves, points


def dark_rows(image: torch.Tensor, fraction: float) -> int:
    """How many pixel rows are dark (< 100 in every channel) over more than `fraction` of the width:
    an axis spine or frame edge; Pillow's frameless drawing has none."""
    dark = (image < 100).all(dim=0)
    return int((dark.float().mean(dim=1) > fraction).sum())


@needs_matplotlib
def test_curve_plot_is_a_matplotlib_figure_with_axes() -> None:
    image = curve_plot(*sine_inputs(), title="validation task 0", truth=(2.0, 1.0))
    assert image.dtype == torch.uint8 and image.shape == (3, 400, 640)
    assert len(torch.unique(image.flatten(1), dim=1).T) > 50  # antialiased lines, text: many colours
    assert dark_rows(image, 0.4) >= 1  # the frame's top and bottom edges
    raster = pillow_curve_plot(*sine_inputs())
    assert raster.shape == (3, 240, 360) and dark_rows(raster, 0.4) == 0


@needs_matplotlib
def test_attention_map_draws_class_boundaries_and_a_colour_bar() -> None:
    uniform = torch.ones(4, 4)
    with_lines = attention_map(uniform, title="t", row_label="query", col_label="support", row_breaks=[2])
    without = attention_map(uniform, title="t", row_label="query", col_label="support")
    assert with_lines.dtype == torch.uint8 and with_lines.shape == (3, 480, 640)

    def white_rows_inside_the_matrix(image: torch.Tensor) -> int:
        """Rows that are white where the rows 4 px above and below show the matrix's yellow."""
        yellow = (image[0] > 200) & (image[1] > 200) & (image[2] < 100)  # viridis' top colour, FDE725
        white = (image > 240).all(dim=0)
        width = image.shape[2]
        return sum(1 for r in range(4, image.shape[1] - 4)
                   if yellow[r - 4].sum() > width / 3 and yellow[r + 4].sum() > width / 3
                   and white[r].sum() > width / 3)

    assert white_rows_inside_the_matrix(with_lines) >= 1
    assert white_rows_inside_the_matrix(without) == 0
    # the colour bar: a column right of the matrix running through viridis, dark purple to yellow
    ramp = torch.rand(6, 6)
    image = attention_map(ramp, title="t", row_label="query", col_label="support")
    columns = image[:, :, 500:].flatten(1)
    assert len(torch.unique(columns, dim=1).T) > 300  # ~750 with the bar, ~70 (cells, tick labels) without
    assert not torch.equal(image, heatmap(ramp))


@needs_matplotlib
def test_pictures_do_not_depend_on_the_process_rcparams() -> None:
    """The report's paper style (or a matplotlibrc) changes global rcParams; the pictures keep their look."""
    import matplotlib

    plain = curve_plot(*sine_inputs(), title="validation task 0")
    with matplotlib.rc_context({"font.size": 5, "lines.linewidth": 6, "axes.grid": False, "figure.dpi": 200}):
        assert torch.equal(curve_plot(*sine_inputs(), title="validation task 0"), plain)


def test_ticks_sit_at_class_centres_or_on_every_entry() -> None:
    names = ["class 0"] * 2 + ["class 1"] * 2 + ["class 2"] * 2
    assert _ticks(6, names, [2, 4]) == ([0.5, 2.5, 4.5], ["class 0", "class 1", "class 2"])
    assert _ticks(3, ["-1.0", "0.5", "2.0"], []) == ([0.0, 1.0, 2.0], ["-1.0", "0.5", "2.0"])
    assert _ticks(75, None, [])[0] == [float(p) for p in range(0, 75, 8)]  # about ten, not 75


def test_sine_fit_recovers_amplitude_and_phase_and_refuses_other_curves() -> None:
    x = np.linspace(-5, 5, 20)
    amplitude, phase = sine_fit(x, 3.0 * np.sin(x - 1.2))  # type: ignore[misc]
    assert amplitude == pytest.approx(3.0) and phase == pytest.approx(1.2)
    assert sine_fit(x, x ** 2) is None


def test_without_matplotlib_the_pillow_drawing_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_matplotlib(monkeypatch)
    with pytest.raises(ImportError):
        importlib.import_module("matplotlib.figure")
    image = curve_plot(*sine_inputs(), title="validation task 0")
    assert torch.equal(image, pillow_curve_plot(*sine_inputs()))
    matrix = torch.rand(5, 3)
    assert torch.equal(attention_map(matrix, title="t", row_label="q", col_label="s", row_breaks=[2]),
                       heatmap(matrix, row_breaks=[2]))


def test_training_never_imports_matplotlib() -> None:
    """The algorithms, the trainer and the loggers import the drawing modules; matplotlib itself loads only
    when a picture is drawn."""
    code = ("import sys, metarun.run, metarun.trainer, metarun.loggers, metarun.plotting, metarun.algorithms.heatmap\n"
            "import metarun.algorithms.maml, metarun.algorithms.feat, metarun.algorithms.incontext\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def read_images(log_dir: Path) -> dict[str, list[np.ndarray]]:
    """Every image in a TensorBoard log directory, decoded: tag -> [H, W, 3] arrays in step order."""
    events = EventAccumulator(str(log_dir), size_guidance={IMAGES: 0})
    events.Reload()
    return {tag: [np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")) for e in events.Images(tag)]
            for tag in events.Tags()["images"]}


def test_pictures_reach_the_event_file_pixel_for_pixel(tmp_path: Path) -> None:
    pictures = {"val/adaptation": curve_plot(*sine_inputs(), title="validation task 0"),
                "val/attention": attention_map(torch.rand(6, 4), title="t", row_label="q", col_label="s")}
    logger = TensorBoardLogger(tmp_path)
    logger.log_images(pictures, step=7)
    logger.close()
    written = read_images(tmp_path)
    assert sorted(written) == sorted(pictures)
    for tag, picture in pictures.items():
        (decoded,) = written[tag]
        np.testing.assert_array_equal(decoded, picture.permute(1, 2, 0).numpy())


@needs_matplotlib
def test_a_sine_run_logs_the_adaptation_figure(smoke_run: Path) -> None:
    """`metarun train debug=smoke` (MAML on sine) validates once and logs the matplotlib figure."""
    (picture,) = read_images(smoke_run / "tb")["val/adaptation"]
    assert picture.shape == (400, 640, 3) and picture.std() > 0
