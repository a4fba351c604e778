"""Gradient noise scale: estimator algebra, unbiasedness, and B_simple on gradients of known noise."""

import json
import math
import os
import socket
import time

import pytest
import torch

from accum.noise import (
    LocalGradientNormHook,
    MicroGradientNorms,
    NoiseScaleTracker,
    describe_unavailable,
    estimate_noise,
    grad_sq_norm,
    measurement_method,
    recommend_batch,
)

DIM = 1000
G_SQ = 10.0  # |G|^2 of the true gradient
B_TRUE = 32.0  # tr(Sigma) / |G|^2
TRACE = G_SQ * B_TRUE


def true_gradient() -> torch.Tensor:
    return torch.full((DIM,), math.sqrt(G_SQ / DIM), dtype=torch.float64)


def per_item_gradients(n: int, gen: torch.Generator) -> torch.Tensor:
    """n per-item gradients G + noise, noise ~ N(0, Sigma) with Sigma = (TRACE / DIM) I."""
    noise = torch.randn(n, DIM, generator=gen, dtype=torch.float64) * math.sqrt(TRACE / DIM)
    return true_gradient() + noise


def test_estimate_is_exact_on_expected_norms():
    b_small, b_big = 8, 64
    g_sq, trace = estimate_noise(G_SQ + TRACE / b_small, b_small, G_SQ + TRACE / b_big, b_big)
    assert g_sq == pytest.approx(G_SQ, rel=1e-12)
    assert trace == pytest.approx(TRACE, rel=1e-12)


@pytest.mark.parametrize(
    "args",
    [(1.0, 64, 1.0, 64), (1.0, 65, 1.0, 64), (1.0, 0, 1.0, 64), (-1.0, 8, 1.0, 64), (math.inf, 8, 1.0, 64)],
)
def test_estimate_rejects_bad_input(args):
    with pytest.raises(ValueError):
        estimate_noise(*args)


def test_estimates_are_unbiased():
    gen = torch.Generator().manual_seed(0)
    b_small, n_small, trials = 4, 4, 2000
    g_sqs, traces = [], []
    for _ in range(trials):
        items = per_item_gradients(b_small * n_small, gen)
        small = items.view(n_small, b_small, DIM).mean(1)
        g_small_sq = small.square().sum(1).mean().item()
        g_big_sq = items.mean(0).square().sum().item()
        g_sq, trace = estimate_noise(g_small_sq, b_small, g_big_sq, b_small * n_small)
        g_sqs.append(g_sq)
        traces.append(trace)
    g_sqs, traces = torch.tensor(g_sqs), torch.tensor(traces)
    # The sample mean is within 4 standard errors of the truth (and the truth is a few % of it).
    assert abs(g_sqs.mean() - G_SQ) < 4 * g_sqs.std() / math.sqrt(trials)
    assert abs(traces.mean() - TRACE) < 4 * traces.std() / math.sqrt(trials)


def test_tracker_recovers_b_simple_within_10_percent():
    gen = torch.Generator().manual_seed(1)
    tracker = NoiseScaleTracker(beta=0.99)
    b_small, n_small = 8, 8
    for _ in range(500):
        items = per_item_gradients(b_small * n_small, gen)
        g_small_sq = items.view(n_small, b_small, DIM).mean(1).square().sum(1).mean().item()
        g_big_sq = items.mean(0).square().sum().item()
        tracker.update(g_small_sq, b_small, g_big_sq, b_small * n_small)
    assert tracker.b_simple == pytest.approx(B_TRUE, rel=0.10)
    assert tracker.g_sq == pytest.approx(G_SQ, rel=0.10)
    assert tracker.trace_sigma == pytest.approx(TRACE, rel=0.10)


def test_tracker_is_a_ratio_of_bias_corrected_emas():
    tracker = NoiseScaleTracker(beta=0.5, min_updates=2)
    # Estimates (g_sq, trace) = (1, 4) then (3, 4): from E-norms at b 1 and 2.
    for g_sq, trace in [(1.0, 4.0), (3.0, 4.0)]:
        assert tracker.b_simple is None
        tracker.update(g_sq + trace / 1, 1, g_sq + trace / 2, 2)
    # raw EMAs: g 0.5*0.5*1 + 0.5*3 = 1.75, trace 3.0; correction 1 - 0.25 = 0.75
    assert tracker.g_sq == pytest.approx(1.75 / 0.75)
    assert tracker.trace_sigma == pytest.approx(3.0 / 0.75)
    assert tracker.b_simple == pytest.approx(3.0 / 1.75)  # not the mean of 4/1 and 4/3


def test_tracker_skips_non_finite_and_waits_for_positive_estimates():
    tracker = NoiseScaleTracker(beta=0.9, min_updates=1)
    tracker.update(math.inf, 1, 1.0, 2)
    assert tracker.skipped == 1 and tracker.updates == 0 and tracker.b_simple is None
    tracker.update(1.0, 1, 2.0, 2)  # small norm below big: negative trace estimate
    assert tracker.trace_sigma < 0 and tracker.b_simple is None


def test_tracker_state_round_trips_through_json():
    tracker = NoiseScaleTracker(beta=0.9, min_updates=1)
    tracker.update(5.0, 1, 3.0, 2)
    tracker.update(6.0, 2, 4.0, 8)
    restored = NoiseScaleTracker()
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored.as_dict() == tracker.as_dict()
    assert tracker.update(7.0, 2, 5.0, 4) == restored.update(7.0, 2, 5.0, 4)
    assert set(tracker.as_dict()) >= {"noise_b_simple", "noise_g_sq", "noise_trace_sigma"}


def test_grad_sq_norm_sums_fp32_squares_and_ignores_missing_grads():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
    c = torch.nn.Parameter(torch.zeros(1))
    a.grad = torch.tensor([1.0, 2.0, 3.0])
    b.grad = torch.tensor([300.0, 400.0], dtype=torch.float16)  # squares overflow fp16
    assert grad_sq_norm([a, b, c]) == pytest.approx(14.0 + 250000.0)
    assert grad_sq_norm([c]) == 0.0


def run_window(w: torch.nn.Parameter, items: torch.Tensor, sizes: list[int], norms: MicroGradientNorms):
    """One window the way train.py normalises: each micro-batch backward of sum of losses / total items.
    loss_i = <w, x_i>, so item i's gradient is x_i."""
    total = sum(sizes)
    w.grad = None
    norms.start_window(grad_scale=1.0 / total)
    for chunk in items.split(sizes):
        (chunk @ w).sum().div(total).backward()
        norms.after_backward(items=len(chunk))
    return norms.window_result()


@pytest.mark.parametrize("keep_previous", [True, False])
def test_micro_gradient_norms_match_direct_computation(keep_previous):
    gen = torch.Generator().manual_seed(2)
    w = torch.nn.Parameter(torch.zeros(DIM, dtype=torch.float64))
    norms = MicroGradientNorms([w], keep_previous=keep_previous)
    sizes = [3, 5, 2, 6]
    items = per_item_gradients(sum(sizes), gen)
    for _ in range(2):  # the second window reuses the buffers
        g_small_sq, b_small, g_big_sq, b_big = run_window(w, items, sizes, norms)
        if keep_previous:
            smalls = [chunk.mean(0) for chunk in items.split(sizes)]
            small_sizes = sizes
        else:
            cums = [3, 8, 10]
            smalls = [items[:n].mean(0) for n in cums]
            small_sizes = cums
        expected_small = sum(s.square().sum().item() for s in smalls) / len(smalls)
        assert g_small_sq == pytest.approx(expected_small, rel=1e-9)
        assert b_small == pytest.approx(len(small_sizes) / sum(1 / n for n in small_sizes))
        assert g_big_sq == pytest.approx(items.mean(0).square().sum().item(), rel=1e-9)
        assert b_big == 16


@pytest.mark.parametrize("keep_previous", [True, False])
def test_micro_gradient_norms_recover_b_simple_through_autograd(keep_previous):
    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.zeros(DIM, dtype=torch.float32))
    norms = MicroGradientNorms([w], keep_previous=keep_previous)
    tracker = NoiseScaleTracker(beta=0.99)
    sizes = [6, 10, 8, 8]  # uneven micro-batches, as with token counts
    for _ in range(500):
        items = per_item_gradients(sum(sizes), gen).float()
        tracker.update(*run_window(w, items, sizes, norms))
    assert tracker.b_simple == pytest.approx(B_TRUE, rel=0.10)


def test_a_parameter_reached_twice_in_one_backward_is_normed_whole_or_not_at_all():
    """Re-entrant checkpointing hands a parameter used in two checkpointed segments its gradient in two
    parts. The norm must be of their sum: the first window that shows it is not measured (its first
    part is gone), the later ones keep the parts and match the direct computation."""
    from torch.utils.checkpoint import checkpoint

    gen = torch.Generator().manual_seed(5)
    shared = torch.nn.Parameter(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    head = torch.nn.Parameter(torch.randn(6, dtype=torch.float64, generator=gen))
    norms = MicroGradientNorms([shared, head])

    def loss_of(x, reentrant=True):
        h = checkpoint(lambda t: torch.tanh(t @ shared), x, use_reentrant=reentrant)
        h = checkpoint(lambda t: torch.tanh(t @ shared), h, use_reentrant=reentrant)
        return (h @ head).sum()

    def own_gradient_sq(x) -> float:  # autograd.grad does not run re-entrant checkpoints
        g = torch.autograd.grad(loss_of(x, reentrant=False) / 12, [shared, head])
        return sum(t.square().sum().item() for t in g)

    chunks = [torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    results = []
    for _ in range(2):
        shared.grad = head.grad = None
        norms.start_window(grad_scale=1.0 / 12)
        for x in chunks:
            (loss_of(x) / 12).backward()
            norms.after_backward(items=4)
        results.append(norms.window_result())
    assert results[0] is None
    g_small_sq, b_small, g_big_sq, b_big = results[1]
    c = 1.0 / 12
    expected_small = sum(own_gradient_sq(x) / (c * 4) ** 2 for x in chunks) / 3
    assert g_small_sq == pytest.approx(expected_small, rel=1e-9)
    big = sum(p.grad.square().sum().item() for p in (shared, head)) / (c * 12) ** 2
    assert (b_small, b_big) == (4, 12) and g_big_sq == pytest.approx(big, rel=1e-9)


def test_micro_gradient_norms_need_two_micro_batches():
    w = torch.nn.Parameter(torch.zeros(4))
    norms = MicroGradientNorms([w])
    assert run_window(w, torch.ones(3, 4), [3], norms) is None
    with pytest.raises(ValueError):
        norms.after_backward(items=0)
    with pytest.raises(ValueError):
        norms.start_window(grad_scale=0.0)


def test_measurement_method_and_unavailable_line():
    assert measurement_method(1, 4) == "micro_batches"
    assert measurement_method(2, 1) == "ranks"
    assert measurement_method(1, 1) is None
    assert describe_unavailable(2, 1) is None and describe_unavailable(1, 2) is None
    line = describe_unavailable(1, 1)
    assert "\n" not in line and "accumulation" in line
    with pytest.raises(ValueError):
        describe_unavailable(0, 1)


def test_recommend_batch_rounds_to_a_reachable_split():
    assert recommend_batch(100.0, plan_micro=8, num_processes=2) == 96
    assert recommend_batch(105.0, plan_micro=8, num_processes=2) == 112
    assert recommend_batch(3.0, plan_micro=8, num_processes=2) == 16  # at least one micro x processes
    assert recommend_batch(100.0, plan_micro=8, rounding="power_of_two") == 128
    assert recommend_batch(90.0, plan_micro=8, rounding="power_of_two") == 64
    assert recommend_batch(6400.0, plan_micro=4, items_per_sample=64.0) == 100
    assert recommend_batch(1e6, plan_micro=4, max_batch=512) == 512
    assert recommend_batch(4.0, plan_micro=4, min_batch=32) == 32
    for bad in (None, 0.0, -1.0, math.nan):
        with pytest.raises(ValueError):
            recommend_batch(bad, plan_micro=4)
    with pytest.raises(ValueError):
        recommend_batch(10.0, plan_micro=4, rounding="nearest")


# -- two ranks: the DDP comm hook ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, result_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3, dtype=torch.float64)
    ddp = DDP(model)
    hook = LocalGradientNormHook(ddp.parameters())
    ddp.register_comm_hook(state=None, hook=hook.comm_hook)

    gen = torch.Generator().manual_seed(10)
    x_all = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64)  # 2 micro-batches x (3 + 4 items)
    split = [3, 4] if rank == 0 else [2, 2]  # rank 0: 7 items, rank 1: 4 items; total 11
    total = 11
    rank_x = [x_all[0, : split[0]], x_all[1, : split[1]]] if rank == 0 else [x_all[0, 3:5], x_all[1, 4:6]]
    hook.start_window(grad_scale=world / total)
    with ddp.no_sync():
        (ddp(rank_x[0]).square().sum() * world / total).backward()
    (ddp(rank_x[1]).square().sum() * world / total).backward()
    measured = hook.window_result(sum(split), total, reduce_mean=lambda t: (dist.all_reduce(t), t / world)[1])
    synced = [p.grad.clone() for p in model.parameters()]

    # Reference on one process: per-rank mean gradients and the global one, by plain autograd.
    ref = torch.nn.Linear(5, 3, dtype=torch.float64)
    ref.load_state_dict(model.state_dict())

    def mean_grad(x: torch.Tensor) -> list[torch.Tensor]:
        ref.zero_grad()
        ref(x).square().sum().div(len(x)).backward()
        return [p.grad.clone() for p in ref.parameters()]

    rank0 = torch.cat([x_all[0, :3], x_all[1, :4]])
    rank1 = torch.cat([x_all[0, 3:5], x_all[1, 4:6]])
    sq = [sum(g.square().sum().item() for g in mean_grad(x)) for x in (rank0, rank1)]
    everything = mean_grad(torch.cat([rank0, rank1]))
    if rank == 0:
        ok_grad = all(torch.allclose(a, b, rtol=1e-10) for a, b in zip(synced, everything, strict=True))
        with open(result_path, "w") as f:
            json.dump(
                {
                    "measured": measured,
                    "expected": [
                        (sq[0] + sq[1]) / 2,
                        2 / (1 / 7 + 1 / 4),
                        sum(g.square().sum().item() for g in everything),
                        11.0,
                    ],
                    "grads_match": ok_grad,
                },
                f,
            )
    # as train.py's release_collectives: gloo's workers drop their last collectives before the group goes
    # (without it, 1 run in a full suite ended in std::terminate in rank 1 at teardown)
    dist.barrier()
    time.sleep(0.2)
    dist.destroy_process_group()


@pytest.mark.slow
def test_local_gradient_norm_hook_on_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    result = tmp_path / "result.json"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(result)), nprocs=2, join=True)
    data = json.loads(result.read_text())
    assert data["grads_match"], "the hook must all-reduce like DDP's default (mean over ranks)"
    assert data["measured"] == pytest.approx(data["expected"], rel=1e-9)


# ----------------------------------------------------------------------------- through train.py


def test_noise_scale_in_train_changes_no_weight_and_reports_b_simple(tmp_path):
    """--noise-scale reads the gradients accumulation computes anyway: the run's weights are
    bit-identical to a run without it, and B_simple lands in metrics.jsonl and metrics.json."""
    from tests.helpers.fault_common import TINY, final_weights, identical, run_main

    flags = TINY + ["--max-steps", "12"]
    assert run_main(flags + ["--output-dir", str(tmp_path / "off")]) == (0, [])
    assert run_main(flags + ["--output-dir", str(tmp_path / "on"), "--noise-scale"]) == (0, [])
    assert identical(final_weights(tmp_path / "on"), final_weights(tmp_path / "off"))
    metrics = json.loads((tmp_path / "on" / "metrics.json").read_text())
    assert metrics["noise_method"] == "micro_batches" and metrics["noise_updates"] == 12
    assert metrics["noise_items"] == "tokens"  # CLM: the loss is a mean over tokens
    steps = [json.loads(line) for line in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert [s["noise_b_simple"] is not None for s in steps] == [False] * 9 + [True] * 3  # 10 updates first
    assert metrics["noise_b_simple"] == steps[-1]["noise_b_simple"] > 0
    assert metrics["noise_b_simple_samples"] < metrics["noise_b_simple"]  # tokens -> samples
    assert "noise_b_simple" not in json.loads((tmp_path / "off" / "metrics.json").read_text())


def test_noise_scale_with_nothing_to_compare_says_so_and_trains(tmp_path, capsys):
    from tests.helpers.fault_common import TINY, run_main

    flags = TINY + ["--max-steps", "2", "--grad-accum-steps", "1", "--micro-batch-size", "4", "--noise-scale"]
    assert run_main(flags + ["--output-dir", str(tmp_path / "run")]) == (0, [])
    out = capsys.readouterr()
    assert "one process with accumulation 1 has no smaller batch" in out.out + out.err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["noise_method"] is None
