"""MetaOptNet's and R2-D2's convex base learners (algorithms/convex.py) against references computed another way.

* The SVM dual: the batched interior-point solution against a slow, exact reference (accelerated projected
  gradient with an exact projection onto each example's feasible set, 600 iterations in float64), its KKT
  conditions (stationarity, feasibility, complementary slackness) to 1e-9, the batch against per-task solves,
  and the implicit gradients against central finite differences in float64 (torch.autograd.gradcheck).
* Ridge regression: the Woodbury (n x n) closed form against the direct (d x d) normal equations, for the
  MetaOptNet-RR head and for R2-D2's head with its bias column, 1/sqrt(n) scaling and adjust layer; its
  gradients (features and lambda) against finite differences.
* The algorithms: episode shape overrides, label smoothing, bad settings, the R2-D2 network, the
  piecewise-constant lr schedule, and the CLI on the generated Omniglot fixture.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.convex import kkt_residuals, ridge_dual, solve_svm_dual, svm_dual
from metarun.algorithms.metaoptnet import MetaOptNet, smoothed_cross_entropy
from metarun.algorithms.r2d2 import R2D2
from metarun.benchmarks.base import TaskSpec
from metarun.episodes import TaskBatch
from metarun.errors import UserInputError
from metarun.models.r2d2net import R2D2Net
from metarun.schedules import StepFactors
from tests.image_fixtures import omniglot_tree, start_metarun, finish

F64 = torch.float64


def svm_problem(tasks: int, ways: int, shots: int, dim: int, seed: int = 0,
                dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    """Support features [T, n, d] (class-major, as the samplers lay them out) and one-hot labels [T, n, N]."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(tasks, ways * shots, dim, generator=g, dtype=F64).to(dtype)
    labels = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    return features, F.one_hot(labels, ways).to(dtype)


def project_to_feasible(values: torch.Tensor, onehot: torch.Tensor, C: float) -> torch.Tensor:
    """Exact Euclidean projection of each row onto {a : sum_k a_k = 0, a_k <= C y_k}: with s = C y - a that set
    is the simplex {s >= 0, sum_k s_k = C}, projected onto by sorting (Duchi et al. 2008)."""
    v = C * onehot - values
    u, _ = torch.sort(v, dim=-1, descending=True)
    excess = u.cumsum(dim=-1) - C
    index = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype)
    last = ((u - excess / index) > 0).to(v.dtype).cumsum(dim=-1).argmax(dim=-1, keepdim=True)
    theta = excess.gather(-1, last) / (last + 1).to(v.dtype)
    return C * onehot - (v - theta).clamp_min(0)


def reference_svm_dual(kernel: torch.Tensor, onehot: torch.Tensor, C: float, ridge: float,
                       iterations: int = 600) -> torch.Tensor:
    """Accelerated projected gradient (FISTA) on the strongly convex dual: slow and simple, but exact to
    rounding after enough iterations (its rate is linear, with the condition number (L + ridge) / ridge)."""
    step = 1.0 / (torch.linalg.eigvalsh(kernel).amax(dim=-1) + ridge).view(-1, 1, 1)
    alpha = torch.zeros_like(onehot)
    point, t = alpha, 1.0
    for _ in range(iterations):
        gradient = kernel @ point + ridge * point - onehot
        new = project_to_feasible(point - step * gradient, onehot, C)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        point = new + (t - 1) / t_new * (new - alpha)
        alpha, t = new, t_new
    return alpha


# -- the SVM dual ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("C", [0.1, 1.0])
@pytest.mark.parametrize("ways, shots", [(3, 1), (4, 3)])
def test_svm_solution_matches_the_reference_solver(C: float, ways: int, shots: int) -> None:
    features, onehot = svm_problem(3, ways, shots, dim=6, seed=ways * 10 + shots)
    kernel = features @ features.transpose(1, 2)
    solution = solve_svm_dual(kernel, onehot, C, ridge=1.0, max_iter=50)
    reference = reference_svm_dual(kernel, onehot, C, ridge=1.0)
    torch.testing.assert_close(solution.alpha, reference, rtol=0, atol=1e-8 * C)
    assert (solution.alpha.abs() > 1e-3 * C).any(), "a trivial problem (alpha = 0) would prove nothing"


@pytest.mark.parametrize("ways, shots, dim", [(5, 1, 64), (5, 5, 1600), (5, 15, 64), (20, 2, 64)])
def test_kkt_residuals_of_the_solution_vanish(ways: int, shots: int, dim: int) -> None:
    features, onehot = svm_problem(2, ways, shots, dim, seed=shots)
    features = features * (3 / math.sqrt(dim))  # kernel entries of order 10, as trained embeddings give
    kernel = features @ features.transpose(1, 2)
    solution = solve_svm_dual(kernel, onehot, 0.1, 1.0, max_iter=50)
    assert solution.iterations < 50, "the solver should converge well within 50 iterations"
    residuals = kkt_residuals(kernel, onehot, 0.1, 1.0, solution.alpha, solution.nu, solution.lam)
    assert {k: float(v.max()) for k, v in residuals.items()} == pytest.approx(
        dict.fromkeys(residuals, 0.0), abs=1e-9)


def test_float32_solves_with_the_papers_iteration_counts() -> None:
    """15 iterations (training) converge in float32; 3 (testing) are close enough to classify as the exact
    solution does (qpth's 3 are no closer: scripts/bench_convex.py prints both)."""
    features, onehot = svm_problem(8, 5, 5, 64, seed=3)
    features = features * (3 / 8)
    queries = torch.randn(8, 75, 64, dtype=F64, generator=torch.Generator().manual_seed(4)) * (3 / 8)
    exact = solve_svm_dual(features @ features.transpose(1, 2), onehot, 0.1, 1.0, max_iter=50).alpha
    features32 = features.float()
    kernel32 = features32 @ features32.transpose(1, 2)
    train = solve_svm_dual(kernel32, onehot.float(), 0.1, 1.0, max_iter=15)
    test = solve_svm_dual(kernel32, onehot.float(), 0.1, 1.0, max_iter=3)
    assert train.iterations <= 15 and test.iterations == 3
    assert float((train.alpha.double() - exact).abs().max()) < 1e-5

    def predictions(alpha: torch.Tensor) -> torch.Tensor:
        return ((queries @ features.transpose(1, 2)) @ alpha.double()).argmax(dim=-1)

    assert float((predictions(test.alpha) == predictions(exact)).double().mean()) > 0.9


def test_the_batch_is_solved_as_the_tasks_would_be_one_by_one() -> None:
    features, onehot = svm_problem(5, 5, 2, 8, seed=7)
    kernel = features @ features.transpose(1, 2)
    together = solve_svm_dual(kernel, onehot, 0.1, 1.0, max_iter=50).alpha
    alone = torch.cat([solve_svm_dual(kernel[t:t + 1], onehot[t:t + 1], 0.1, 1.0, max_iter=50).alpha
                       for t in range(5)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize("C", [0.1, 1.0])
def test_svm_gradients_match_finite_differences(C: float) -> None:
    """Through the head as MetaOptNet uses it: query scores Q X^T alpha(X X^T), w.r.t. support and queries."""
    features, onehot = svm_problem(2, 3, 2, 5, seed=11)
    queries = torch.randn(2, 4, 5, dtype=F64, generator=torch.Generator().manual_seed(1))

    def scores(support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        alpha = svm_dual(support @ support.transpose(1, 2), onehot, C, 1.0, max_iter=50)
        return (query @ support.transpose(1, 2)) @ alpha

    inputs = (features.clone().requires_grad_(True), queries.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(scores, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_svm_gradient_with_respect_to_the_kernel_matches_finite_differences() -> None:
    features, onehot = svm_problem(2, 3, 2, 4, seed=5)
    kernel = (features @ features.transpose(1, 2)).requires_grad_(True)
    weights = torch.randn_like(onehot)
    assert torch.autograd.gradcheck(lambda k: (svm_dual(k, onehot, 0.5, 1.0, max_iter=50) * weights).sum(),
                                    (kernel,), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# -- ridge regression ------------------------------------------------------------------------------------------


def direct_ridge(inputs: torch.Tensor, targets: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """W = (X^T X + lam I)^-1 X^T Y: the d x d normal equations, per task."""
    eye = torch.eye(inputs.shape[-1], dtype=inputs.dtype)
    return torch.stack([torch.linalg.solve(x.T @ x + lam * eye, x.T @ y) for x, y in zip(inputs, targets)])


def test_woodbury_closed_form_equals_the_features_by_features_formula() -> None:
    features, onehot = svm_problem(3, 5, 2, 30, seed=2)
    dual = ridge_dual(features @ features.transpose(1, 2), onehot, 50.0)  # a 10 x 10 solve per task
    torch.testing.assert_close(features.transpose(1, 2) @ dual, direct_ridge(features, onehot, 50.0),
                               rtol=1e-10, atol=1e-12)


TOY = TaskSpec(name="toy", kind="classification", input_shape=(6,), output_size=3, ways=3, shots=2, queries=2)


class Identity(torch.nn.Module):
    """A backbone that passes the (vector) inputs through, so heads can be checked on chosen features."""

    out_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def toy_batch(tasks: int = 2, ways: int = 3, shots: int = 2, queries: int = 2, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    query_y = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return TaskBatch(torch.randn(tasks, ways * shots, 6, generator=g, dtype=F64), support_y,
                     torch.randn(tasks, ways * queries, 6, generator=g, dtype=F64), query_y)


def test_metaoptnet_heads_score_queries_with_the_fitted_classifier() -> None:
    batch = toy_batch()
    onehot = F.one_hot(batch.support_y, 3).to(F64)
    ridge = MetaOptNet(Identity(), TOY, head="ridge", init_scale=2.0).double()
    w = direct_ridge(batch.support_x, 2 * onehot, 50.0)  # the code's QP: min 1/2 z^T (K + lam I) z - 2 Y^T z
    torch.testing.assert_close(ridge.logits(batch), 2.0 * batch.query_x @ w, rtol=1e-10, atol=1e-12)
    svm = MetaOptNet(Identity(), TOY).double().eval()
    kernel = batch.support_x @ batch.support_x.transpose(1, 2)
    alpha = reference_svm_dual(kernel, onehot, 0.1, 1.0)
    want = batch.query_x @ (batch.support_x.transpose(1, 2) @ alpha)  # w_k = sum_i alpha_ik x_i
    svm.eval_iterations = 50
    torch.testing.assert_close(svm.logits(batch), want, rtol=0, atol=1e-8)


def test_r2d2_head_is_ridge_regression_with_a_bias_column_and_an_adjust_layer() -> None:
    batch = toy_batch()
    net = R2D2(Identity(), TOY, init_lambda=3.0, init_scale=0.5, init_bias=0.25).double()
    n = batch.support_x.shape[1]
    with_ones = torch.cat([batch.support_x, torch.ones(2, n, 1, dtype=F64)], dim=-1) / math.sqrt(n)
    wb = direct_ridge(with_ones, F.one_hot(batch.support_y, 3).to(F64) / math.sqrt(n), 3.0)  # [T, d + 1, N]
    scores = batch.query_x @ wb[:, :-1] + wb[:, -1:]
    # rtol 1e-6: log(lambda) is a float32 value (as the parameter is created) before the module becomes float64
    torch.testing.assert_close(net.logits(batch), 0.5 * scores + 0.25, rtol=1e-6, atol=1e-9)


class Head(torch.nn.Module):
    """The head of an algorithm as a module call, so functional_call can substitute its parameters."""

    def __init__(self, net: torch.nn.Module, labels: torch.Tensor) -> None:
        super().__init__()
        self.net, self.labels = net, labels

    def forward(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return self.net.head_logits(support, self.labels, query, 3)


def test_ridge_heads_gradients_match_finite_differences() -> None:
    batch = toy_batch()
    r2d2 = Head(R2D2(Identity(), TOY, init_lambda=3.0, init_scale=0.5).double(), batch.support_y)
    inputs = (batch.support_x.clone().requires_grad_(True), batch.query_x.clone().requires_grad_(True),
              torch.tensor(math.log(3.0), dtype=F64, requires_grad=True))
    assert torch.autograd.gradcheck(
        lambda s, q, log_lambda: torch.func.functional_call(r2d2, {"net.log_lambda": log_lambda}, (s, q)),
        inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
    ridge = Head(MetaOptNet(Identity(), TOY, head="ridge", ridge_lambda=2.0).double(), batch.support_y)
    assert torch.autograd.gradcheck(ridge, inputs[:2], eps=1e-6, atol=1e-8, rtol=1e-6)


def test_lambda_is_learned_as_its_log_unless_fixed() -> None:
    learned = R2D2(Identity(), TOY)
    fixed = R2D2(Identity(), TOY, learn_lambda=False)
    assert {n for n, _ in learned.named_parameters()} == {"log_lambda", "scale", "bias"}
    assert {n for n, _ in fixed.named_parameters()} == {"scale", "bias"} and "log_lambda" in dict(fixed.named_buffers())
    assert float(learned.log_lambda.detach().exp()) == pytest.approx(50.0)


# -- the algorithms --------------------------------------------------------------------------------------------


def test_train_episode_asks_for_the_papers_training_shape() -> None:
    assert MetaOptNet(Identity(), TOY).train_episode() == {}
    net = MetaOptNet(Identity(), TOY, head="ridge", train_shots=4, train_queries=3).double()
    assert net.train_episode() == {"shots": 4, "queries": 3}
    loss, metrics = net.meta_loss(toy_batch(shots=4, queries=3))  # a training episode with more shots
    assert math.isfinite(float(loss.detach())) and set(metrics) == {"loss", "accuracy"}
    with pytest.raises(UserInputError, match=r"^algo.train_shots=4, algo.train_queries=3 but the training episodes "
                                             r"have 6 support and 6 query examples per task: .*"
                                             r"set algo.train_shots=null and algo.train_queries=null$"):
        net.meta_loss(toy_batch())
    net.eval()  # evaluation episodes are benchmark-shaped
    assert net.evaluate(toy_batch())["accuracy"].shape == (2,)
    assert R2D2(Identity(), TOY, train_ways=5).train_episode() == {"ways": 5}


def test_label_smoothing_is_the_papers_and_applies_to_training_only() -> None:
    logits = torch.randn(2, 6, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[0, 0, 1, 1, 2, 2]] * 2)
    by_hand = torch.stack([torch.stack([
        -sum((0.9 if k == y else 0.05) * torch.log_softmax(row, dim=-1)[k] for k in range(3))
        for row, y in zip(task, labels)]).mean() for task, labels in zip(logits, targets)])
    torch.testing.assert_close(smoothed_cross_entropy(logits, targets, 0.1), by_hand)
    torch.testing.assert_close(smoothed_cross_entropy(logits, targets, 0.0),
                               F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1))
    net = MetaOptNet(Identity(), TOY, head="ridge", label_smoothing=0.1).double()
    batch = toy_batch()
    logits = net.logits(batch)
    torch.testing.assert_close(net.meta_loss(batch)[0], smoothed_cross_entropy(logits, batch.query_y, 0.1).mean())
    net.eval()
    torch.testing.assert_close(net.meta_loss(batch)[0], smoothed_cross_entropy(logits, batch.query_y, 0.0).mean())


@pytest.mark.parametrize("cls, kwargs, message", [
    (MetaOptNet, {"head": "lasso"}, "algo.head must be one of svm, ridge"),
    (MetaOptNet, {"C": 0.0}, "algo.C must be positive"),
    (MetaOptNet, {"eval_iterations": 0}, "algo.eval_iterations must be at least 1"),
    (MetaOptNet, {"train_shots": 0}, "algo.train_shots must be at least 1"),
    (MetaOptNet, {"label_smoothing": 1.0}, r"algo.label_smoothing must be in \[0, 1\)"),
    (R2D2, {"init_lambda": -1.0}, "algo.init_lambda must be positive"),
    (R2D2, {"train_ways": 1}, "algo.train_ways must be at least 2"),
])
def test_bad_settings_are_rejected(cls: type, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(Identity(), TOY, **kwargs)


def test_r2d2_network_features_and_running_statistics() -> None:
    assert R2D2Net((1, 28, 28)).out_features == (384 + 512) * 2 * 2  # 3584, the authors' Omniglot size
    assert R2D2Net((3, 84, 84)).out_features == (384 + 512) * 9 * 9  # 72576 on miniImageNet
    torch.manual_seed(0)
    net = R2D2Net((1, 16, 16), channels=[4, 4, 6, 8], bn="transductive").double()
    x = torch.rand(3, 5, 1, 16, 16, dtype=F64)
    batched = torch.func.vmap(net)(x)
    assert batched.shape == (3, 5, net.out_features)
    torch.testing.assert_close(batched, torch.stack([net(task) for task in x]), rtol=1e-10, atol=1e-12)
    inductive = R2D2Net((1, 16, 16), channels=[4, 4, 6, 8], bn="inductive")
    inductive.update_running_stats(x.float(), x.float())
    assert all(float(norm.running_mean.abs().sum()) > 0 for norm in inductive.norms)
    with pytest.raises(ValueError, match="at least 16x16"):
        R2D2Net((1, 14, 14))


def test_step_factors_schedule_and_its_checkpoint() -> None:
    factors = StepFactors([19000, 39000, 49000], [1.0, 0.06, 0.012, 0.0024])
    assert [factors(s) for s in (0, 18999, 19000, 38999, 39000, 49000, 59999)] == [
        1.0, 1.0, 0.06, 0.06, 0.012, 0.0024, 0.0024]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    state = scheduler.state_dict()
    import io
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["lr_lambdas"][0] == {"milestones": [19000, 39000, 49000],
                                                                     "factors": [1.0, 0.06, 0.012, 0.0024]}
    with pytest.raises(ValueError, match="one more factor than milestones"):
        StepFactors([1, 2], [1.0, 0.5])


def test_cli_trains_both_heads_with_the_r2d2_network_and_refuses_sine(tmp_path: Path) -> None:
    root = omniglot_tree(tmp_path / "omniglot", {f"Alphabet_{c}": 2 for c in "ABCDEF"}, {"Script_X": 2, "Script_Y": 2})
    env = {"METARUN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    sweep = tmp_path / "sweep"
    trained = start_metarun("train", "-m", "algo=metaoptnet", "algo.head=svm,ridge", "model=r2d2net",
                            "model.channels=[8,8,8,8]", "benchmark=omniglot", f"benchmark.root={root}",
                            "benchmark.split_scheme=lake", "benchmark.image_size=16", "benchmark.queries=2",
                            "debug=smoke", "logger.tensorboard=false", "logger.console=false",
                            f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=env)
    refused = start_metarun("train", "algo=r2d2", "benchmark=sine", "debug=smoke", f"hydra.run.dir={tmp_path / 'sine'}",
                            cwd=tmp_path, env=env)
    done = finish(trained, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for job in ("0", "1"):
        results = json.loads((sweep / job / "results.json").read_text())
        assert results["algo"] == "metaoptnet" and results["tasks"] == 6 and math.isfinite(results["mean"])
    no = finish(refused, timeout=120)
    assert no.returncode == 2
    assert [line for line in no.stderr.splitlines() if line.strip()] == [
        "metarun: error: algo=r2d2 supports only classification and benchmark=sine is regression; "
        "use algo=maml, algo=metasgd or algo=reptile"]
