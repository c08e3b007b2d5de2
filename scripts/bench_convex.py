"""The convex heads of MetaOptNet and R2-D2: metarun's batched SVM solver against qpth, and the ridge heads.

For each setup (a batch of tasks' support and query features, the head's only inputs), the gradients come
first, in float64: every head (converged) against central finite differences along a random direction, and
qpth's (and cvxpylayers', when installed) scores and gradient against metarun's. metarun's heads are timed
only within GRADIENT_TOLERANCE of finite differences, the other solvers within COMPARISON_TOLERANCE of metarun. Then every variant
runs interleaved rounds after a warm-up, in float32 as in training: the head's forward and backward pass
(solve, scores, cross-entropy, gradient to the features) with the training iteration cap (15), and the test-time
solve without gradients (3 iterations), whose predictions are compared with the exact solution's.
Medians of episodes/s (tasks per second). A solver that raises is reported with its error, not skipped silently.

    python scripts/bench_convex.py                        # CPU, every setup
    python scripts/bench_convex.py --device cuda --setup omniglot-20w5s
    pip install qpth cvxpylayers                          # the comparisons (optional; qpth needs cvxpy, numpy<2)

scripts/bench.py runs the same measurement (these functions, imported) on a few setups beside its MAML tables.

qpth (0.0.18) is what MetaOptNet used: a batched primal-dual interior-point method (the same Mehrotra
predictor-corrector) on the dense (nN x nN) block kernel K (x) I_N with the code's "+ 1.0 I"; metarun's solver
(metarun/algorithms/convex.py) works on the n x n blocks instead. Both take the same K, labels, C = 0.1.
cvxpylayers solves each task's QP as a cone program (SCS through diffcp); it is timed on the small setups only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import Tensor

from metarun.algorithms.convex import ridge_dual, solve_svm_dual, svm_dual
from metarun.runtime import configure_runtime

GRADIENT_TOLERANCE = 1e-5  # metarun's gradient against finite differences, relative, float64
COMPARISON_TOLERANCE = 1e-3  # another solver's gradient against metarun's: timed when within this (both shown)
C, RIDGE, TRAIN_ITERATIONS, TEST_ITERATIONS = 0.1, 1.0, 15, 3
Head = Callable[[Tensor, Tensor, Tensor], Tensor]  # (support [T, n, d], onehot [T, n, N], query) -> scores
QPTH_WARNINGS: dict[int, int] = {}  # maxIter -> calls after which qpth printed "Returning an inaccurate ... solution"
QPTH_MAX_VARIABLES = 500  # qpth is skipped above this many dual variables per task: its dense KKT grows as (nN)^3
QPTH_MISSING = "qpth not installed: pip install qpth in the benchmark's environment"  # its row, when absent


@dataclass
class Setup:
    name: str
    ways: int
    shots: int
    queries: int
    dim: int
    tasks: int = 8  # MetaOptNet's meta-batch
    note: str = ""

    @property
    def variables(self) -> int:
        return self.ways * self.shots * self.ways


SETUPS = {s.name: s for s in (
    Setup("omniglot-5w1s", 5, 1, 15, 64, note="Conv-4 Omniglot features"),
    Setup("omniglot-5w5s", 5, 5, 15, 64),
    Setup("omniglot-20w1s", 20, 1, 15, 64),
    Setup("omniglot-20w5s", 20, 5, 15, 64),
    Setup("mini-5w1s", 5, 1, 15, 1600, note="Conv-4 miniImageNet features"),
    Setup("mini-5w5s", 5, 5, 15, 1600),
    Setup("mini-train-5w15s", 5, 15, 6, 16000, note="MetaOptNet's training episodes, ResNet-12 features"),
)}


def make_problem(setup: Setup, dtype: torch.dtype, device: torch.device, seed: int = 0
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random support/query features (kernel entries of order 10, as trained embeddings give), one-hot labels."""
    g = torch.Generator().manual_seed(seed)
    n, q = setup.ways * setup.shots, setup.ways * setup.queries
    scale = 3 / math.sqrt(setup.dim)
    support = torch.randn(setup.tasks, n, setup.dim, generator=g, dtype=torch.float64) * scale
    query = torch.randn(setup.tasks, q, setup.dim, generator=g, dtype=torch.float64) * scale
    labels = torch.arange(setup.ways).repeat_interleave(setup.shots).expand(setup.tasks, -1)
    query_labels = torch.arange(setup.ways).repeat_interleave(setup.queries).expand(setup.tasks, -1)
    onehot = F.one_hot(labels, setup.ways).to(torch.float64)
    return (support.to(device, dtype), onehot.to(device, dtype), query.to(device, dtype), query_labels.to(device))


# -- the heads -------------------------------------------------------------------------------------------------


def metarun_svm(iterations: int) -> Head:
    def head(support: Tensor, onehot: Tensor, query: Tensor) -> Tensor:
        alpha = svm_dual(support @ support.transpose(1, 2), onehot, C, RIDGE, iterations)
        return (query @ support.transpose(1, 2)) @ alpha
    return head


def qpth_svm(iterations: int) -> Head:
    """MetaOptNetHead_SVM_CS's QP handed to qpth's QPFunction (its eq. with the code's block kernel)."""
    from qpth.qp import QPFunction

    def head(support: Tensor, onehot: Tensor, query: Tensor) -> Tensor:
        tasks, n, ways = onehot.shape
        kernel = support @ support.transpose(1, 2)
        eye_n, eye_all = (torch.eye(k, dtype=support.dtype, device=support.device) for k in (ways, n * ways))
        block = (kernel[:, :, None, :, None] * eye_n[None, None, :, None, :]).reshape(tasks, n * ways, n * ways)
        G = block + RIDGE * eye_all
        e = -onehot.reshape(tasks, n * ways)
        inequality = eye_all.expand(tasks, n * ways, n * ways)
        h = C * onehot.reshape(tasks, n * ways)
        A = torch.kron(torch.eye(n, dtype=support.dtype, device=support.device),
                       torch.ones(1, ways, dtype=support.dtype, device=support.device)).expand(tasks, n, n * ways)
        b = support.new_zeros(tasks, n)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # qpth prints a warning when its residuals stay large
            alpha = QPFunction(verbose=False, maxIter=iterations)(G, e, inequality, h, A, b).reshape(tasks, n, ways)
        QPTH_WARNINGS[iterations] = QPTH_WARNINGS.get(iterations, 0) + printed.getvalue().count("qpth warning")
        return (query @ support.transpose(1, 2)) @ alpha
    return head


def cvxpylayers_svm() -> Head:
    """The same dual as a cvxpy problem per task, parametrised by the support features (DPP: X^T alpha)."""
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    cache: dict[tuple[int, int, int], CvxpyLayer] = {}

    def layer(n: int, ways: int, dim: int) -> CvxpyLayer:
        if (n, ways, dim) not in cache:
            X, Y = cp.Parameter((dim, n)), cp.Parameter((n, ways))
            alpha = cp.Variable((n, ways))
            objective = 0.5 * cp.sum_squares(X @ alpha) + 0.5 * RIDGE * cp.sum_squares(alpha) - cp.sum(cp.multiply(Y, alpha))
            problem = cp.Problem(cp.Minimize(objective), [cp.sum(alpha, axis=1) == 0, alpha <= C * Y])
            cache[(n, ways, dim)] = CvxpyLayer(problem, parameters=[X, Y], variables=[alpha])
        return cache[(n, ways, dim)]

    def head(support: Tensor, onehot: Tensor, query: Tensor) -> Tensor:
        tasks, n, ways = onehot.shape
        (alpha,) = layer(n, ways, support.shape[-1])(support.transpose(1, 2).double(), onehot.double(),
                                                     solver_args={"eps": 1e-10, "max_iters": 100000})
        return (query @ support.transpose(1, 2)) @ alpha.to(support.dtype)  # cvxpylayers works in float64
    return head


def metaoptnet_ridge(support: Tensor, onehot: Tensor, query: Tensor) -> Tensor:
    return (query @ support.transpose(1, 2)) @ (2.0 * ridge_dual(support @ support.transpose(1, 2), onehot, 50.0))


def r2d2_ridge(support: Tensor, onehot: Tensor, query: Tensor) -> Tensor:
    n = support.shape[1]
    inputs = torch.cat([support, support.new_ones(*support.shape[:2], 1)], dim=-1) / math.sqrt(n)
    dual = ridge_dual(inputs @ inputs.transpose(1, 2), onehot / math.sqrt(n), 50.0)
    queries = torch.cat([query, query.new_ones(*query.shape[:2], 1)], dim=-1)
    return 10.0 * ((queries @ inputs.transpose(1, 2)) @ dual)  # the Omniglot preset's initial scale


# -- gradients first -------------------------------------------------------------------------------------------


def loss_of(head: Head, support: Tensor, onehot: Tensor, query: Tensor, query_labels: Tensor) -> Tensor:
    scores = head(support, onehot, query)
    return F.cross_entropy(scores.flatten(0, 1), query_labels.flatten())


def finite_difference_error(head: Head, setup: Setup, device: torch.device, eps: float = 1e-5) -> float:
    """Relative error of <grad, v> against (L(x + eps v) - L(x - eps v)) / 2 eps, v random, in float64."""
    support, onehot, query, labels = make_problem(setup, torch.float64, device)
    v = torch.randn(support.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    x = support.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(head, x, onehot, query, labels), x)
    with torch.no_grad():
        numeric = (loss_of(head, support + eps * v, onehot, query, labels)
                   - loss_of(head, support - eps * v, onehot, query, labels)) / (2 * eps)
    analytic = (grad * v).sum()
    return float((analytic - numeric).abs() / numeric.abs().clamp_min(1e-300))


def agreement_with(head: Head, reference: Head, setup: Setup, device: torch.device) -> tuple[float, float]:
    """(max |scores - reference scores| / max |reference scores|, relative gradient difference), float64."""
    support, onehot, query, labels = make_problem(setup, torch.float64, device)
    out = []
    for h in (head, reference):
        x = support.clone().requires_grad_(True)
        scores = h(x, onehot, query)
        (grad,) = torch.autograd.grad(F.cross_entropy(scores.flatten(0, 1), labels.flatten()), x)
        out.append((scores.detach(), grad))
    (s, g), (rs, rg) = out
    return float((s - rs).abs().max() / rs.abs().max()), float((g - rg).norm() / rg.norm())


# -- timing ----------------------------------------------------------------------------------------------------


def train_step(head: Head, problem: tuple[Tensor, Tensor, Tensor, Tensor], device: torch.device) -> Callable[[], None]:
    support, onehot, query, labels = problem

    def step() -> None:
        x = support.detach().requires_grad_(True)
        loss_of(head, x, onehot, query, labels).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def test_step(head: Head, problem: tuple[Tensor, Tensor, Tensor, Tensor], device: torch.device) -> Callable[[], None]:
    support, onehot, query, _ = problem

    def step() -> None:
        with torch.no_grad():
            head(support, onehot, query)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def rate(step: Callable[[], None], seconds: float, minimum: int = 2) -> float:
    """Calls per second over at least `seconds` and `minimum` calls."""
    count, start = 0, time.perf_counter()
    while count < minimum or time.perf_counter() - start < seconds:
        step()
        count += 1
    return count / (time.perf_counter() - start)


def test_agreement(head: Head, setup: Setup, device: torch.device) -> float:
    """Fraction of float32 test-time predictions equal to those of the exact (float64, converged) solution."""
    support, onehot, query, _ = make_problem(setup, torch.float64, device)
    exact = solve_svm_dual(support @ support.transpose(1, 2), onehot, C, RIDGE, max_iter=60).alpha
    want = ((query @ support.transpose(1, 2)) @ exact).argmax(dim=-1)
    with torch.no_grad():
        got = head(support.float(), onehot.float(), query.float()).argmax(dim=-1)
    return float((got == want).double().mean())


def run_setup(setup: Setup, device: torch.device, args: argparse.Namespace, console: Console) -> None:
    train_variants: dict[str, Head] = {f"metarun SVM ({TRAIN_ITERATIONS} it)": metarun_svm(TRAIN_ITERATIONS)}
    test_variants: dict[str, Head] = {f"metarun SVM ({TEST_ITERATIONS} it)": metarun_svm(TEST_ITERATIONS)}
    notes: dict[str, str] = {}
    checks: dict[str, str] = {}
    absent: dict[str, str] = {}  # a comparison that could not run here: a row of its own, saying why
    try:
        import qpth  # noqa: F401

        if setup.variables <= args.qpth_max_variables:
            train_variants[f"qpth SVM (maxIter {TRAIN_ITERATIONS})"] = qpth_svm(TRAIN_ITERATIONS)
            test_variants[f"qpth SVM (maxIter {TEST_ITERATIONS})"] = qpth_svm(TEST_ITERATIONS)
        else:
            notes["qpth"] = f"not run: {setup.variables} variables > --qpth-max-variables {args.qpth_max_variables}"
    except ImportError:
        absent[f"qpth SVM (maxIter {TRAIN_ITERATIONS})"] = QPTH_MISSING
    try:
        import cvxpylayers  # noqa: F401

        if setup.variables <= 125:
            train_variants["cvxpylayers SVM (SCS)"] = cvxpylayers_svm()
    except ImportError:
        notes["cvxpylayers"] = "not installed"
    train_variants["metarun ridge (MetaOptNet-RR)"] = metaoptnet_ridge
    train_variants["metarun ridge (R2-D2)"] = r2d2_ridge

    # gradients first (float64): every head against finite differences; the other solvers against metarun too
    reference = metarun_svm(60)
    timed: dict[str, Head] = {}
    for name, head in train_variants.items():
        try:
            if name.startswith("metarun"):
                exact = metarun_svm(60) if "SVM" in name else head
                error = finite_difference_error(exact, setup, device)
                checks[name] = f"FD {error:.1e}"
                tolerance = GRADIENT_TOLERANCE
            else:
                exact = qpth_svm(60) if name.startswith("qpth") else head
                own = finite_difference_error(exact, setup, device)
                scores, error = agreement_with(exact, reference, setup, device)
                checks[name] = f"FD {own:.1e}; vs metarun: scores {scores:.1e}, grad {error:.1e}"
                tolerance = COMPARISON_TOLERANCE
            if error <= tolerance:
                timed[name] = head
            else:
                notes[name] = f"not timed: gradient error {error:.1e} > {tolerance:g}"
        except Exception as ex:  # a solver that fails is a measurement too
            notes[name] = f"FAILED: {type(ex).__name__}: {str(ex).splitlines()[0][:120]}"

    problems = [make_problem(setup, torch.float32, device, seed=i) for i in range(2)]
    steps = {name: train_step(head, problems[0], device) for name, head in timed.items()}
    steps.update({f"test: {name}": test_step(head, problems[0], device) for name, head in test_variants.items()})
    for name, step in list(steps.items()):  # warm-up; a float32 failure is reported too
        try:
            rate(step, args.seconds / 4, 1)
        except Exception as ex:
            notes[name] = f"FAILED (float32): {type(ex).__name__}: {str(ex).splitlines()[0][:120]}"
            del steps[name]
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            rates[name].append(rate(step, args.seconds))
    medians = {name: statistics.median(r) * setup.tasks for name, r in rates.items()}
    agreement = {f"test: {name}": test_agreement(head, setup, device) for name, head in test_variants.items()
                 if f"test: {name}" in steps}

    n = setup.ways * setup.shots
    base = f"metarun SVM ({TRAIN_ITERATIONS} it)"
    table = Table(title=f"{setup.name}: {setup.tasks} tasks, {setup.ways}-way {setup.shots}-shot, {setup.queries} "
                        f"queries/class, {setup.dim}-d features ({setup.note or 'random'}); {n} x {setup.ways} = "
                        f"{setup.variables} dual variables per task; {device.type}, {torch.get_num_threads()} "
                        f"threads, median of {args.rounds} interleaved rounds")
    for column in ("variant", "episodes/s", "vs metarun SVM", "float64 check", "test predictions = exact"):
        table.add_column(column, justify="right", no_wrap=True)
    for name in steps:
        speed = f"{medians[name] / medians[base]:.2f}x" if base in medians and not name.startswith("test") else ""
        table.add_row(name, f"{medians[name]:.3g}", speed, checks.get(name.removeprefix("test: "), ""),
                      f"{agreement[name]:.1%}" if name in agreement else "")
    for name, reason in absent.items():
        table.add_row(name, reason, "", "", "")
    console.print(table)
    for iterations, count in sorted(QPTH_WARNINGS.items()):
        if count:
            notes[f"qpth (maxIter {iterations})"] = f"printed its 'inaccurate and potentially incorrect solution' warning " \
                                                    f"in {count} calls"
    QPTH_WARNINGS.clear()
    for name, note in notes.items():
        console.print(f"  {name}: {note}" + (f" ({checks[name]})" if name in checks else ""))


def versions() -> str:
    """torch's and the comparisons' versions (or their absence): which solver a figure belongs to."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("qpth", "cvxpylayers"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} not installed")
    return f"torch {torch.__version__}, {', '.join(found)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", nargs="+", choices=sorted(SETUPS), default=list(SETUPS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per variant per round (at least 2 calls)")
    parser.add_argument("--qpth-max-variables", type=int, default=QPTH_MAX_VARIABLES,
                        help="skip qpth above this many dual variables per task (its dense KKT grows as (nN)^3)")
    args = parser.parse_args()
    configure_runtime(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    console = Console(width=max(200, Console().width))  # whole rows, even qpth's "not installed" one
    console.print(versions())
    for name in args.setup:
        run_setup(SETUPS[name], device, args, console)


if __name__ == "__main__":
    main()
