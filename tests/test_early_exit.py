"""EarlyExitModel: exactness at both threshold extremes, per-sample routing against a brute-force
reference, refusal of cross-stage models, calibration, saving and loading."""

from __future__ import annotations

import copy
import json
import math
import sys
from functools import partial

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gradual_sd import BottleneckHead, EarlyExitModel, GradualSelfDistiller, PooledHead, StageInfo
from gradual_sd.early_exit import (
    ExitCosts,
    choose_thresholds,
    choose_thresholds_within_cost,
    evaluate,
    expected_calibration_error,
    route,
)
from gradual_sd._taps import to_feature_map

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
MODELS = {
    "resnet18": dict(model_name="resnet18"),
    "vit": dict(model_name="vit_tiny_patch16_224", img_size=SIZE, patch_size=8, depth=4),
    "convnext_atto": dict(model_name="convnext_atto"),
    "efficientnet_b0": dict(model_name="efficientnet_b0"),
    "swin": dict(  # NHWC stages
        model_name="swin_tiny_patch4_window7_224",
        img_size=SIZE,
        window_size=2,
        depths=(1, 1, 1, 1),
        embed_dim=24,
        num_heads=(1, 2, 3, 4),
    ),
}


def build(name: str, head_factory=None, seed: int = 0) -> tuple[EarlyExitModel, nn.Module]:
    """An early-exit model on a random timm model, and an untouched copy of that model. The
    heads' logits are scaled up so that their confidences spread over (0, 1)."""
    torch.manual_seed(seed)
    model = timm.create_model(num_classes=5, **MODELS[name]).eval()
    plain = copy.deepcopy(model)
    options = {} if head_factory is None else {"head_factory": head_factory}
    distiller = GradualSelfDistiller(model, example_input=torch.zeros(1, 3, SIZE, SIZE), **options)
    with torch.no_grad():
        for head in distiller.heads:
            head.fc.weight.mul_(30.0)
    exits = EarlyExitModel.from_distiller(distiller, example_input=torch.zeros(1, 3, SIZE, SIZE))
    return exits, plain


def images(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def count_calls(exits: EarlyExitModel) -> tuple[dict[str, list[int]], list]:
    """Batch sizes each stage and the classifier ran on, recorded by extra forward hooks (run
    before the exits' hooks, which may end the forward)."""
    names = [*exits.stage_names, exits.classifier_name]
    seen: dict[str, list[int]] = {name: [] for name in names}
    handles = [
        exits.model.get_submodule(name).register_forward_hook(
            lambda m, a, o, name=name: seen[name].append(a[0].shape[0]), prepend=True
        )
        for name in names
    ]
    return seen, handles


@pytest.fixture(scope="module")
def resnet() -> tuple[EarlyExitModel, nn.Module]:
    return build("resnet18")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_thresholds_above_one_give_the_plain_model_exactly(name):
    exits, plain = build(name)
    x = images()
    with torch.no_grad():
        out = exits(x)
        expected = plain(x)
        inside = exits.model(x)  # the hooks do nothing outside EarlyExitModel.forward
    assert torch.equal(out.logits, expected)
    assert torch.equal(inside, expected)
    assert out.exit_index.dtype == torch.long
    assert out.exit_index.tolist() == [len(exits.heads)] * len(x)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_threshold_zero_exits_at_the_first_head_and_skips_the_rest(name):
    exits, plain = build(name)
    x = images()
    stage0 = []
    handle = plain.get_submodule(exits.stage_names[0]).register_forward_hook(lambda m, a, o: stage0.append(o))
    with torch.no_grad():
        plain(x)
        handle.remove()
        feature_map = to_feature_map(stage0[0], exits.layouts[0], exits.num_prefix_tokens[0])
        expected, _ = exits.heads[0](feature_map)
        exits.set_thresholds(0.0)
        seen, handles = count_calls(exits)
        out = exits(x)
    for h in handles:
        h.remove()
    assert torch.equal(out.logits, expected)
    assert out.exit_index.tolist() == [0] * len(x)
    assert seen[exits.stage_names[0]] == [len(x)]
    assert all(seen[name] == [] for name in [*exits.stage_names[1:], exits.classifier_name])


def brute_force(exits: EarlyExitModel, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Run every head on every sample, then pick each sample's exit by the rule, one by one."""
    with torch.no_grad():
        logits = exits.exit_logits(x)
    chosen, index = [], []
    for i in range(len(x)):
        k = next(
            (k for k, t in enumerate(exits.thresholds) if logits[k][i].softmax(-1).max().item() >= t),
            len(exits.heads),
        )
        chosen.append(logits[k][i])
        index.append(k)
    return torch.stack(chosen), index


def mixed_thresholds(exits: EarlyExitModel, x: torch.Tensor) -> None:
    """Thresholds at the 70th percentile of each head's confidence: some samples leave at every
    exit."""
    with torch.no_grad():
        logits = exits.exit_logits(x)
    exits.set_thresholds([z.softmax(-1).amax(-1).quantile(0.7).item() for z in logits[:-1]])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mixed_batch_matches_brute_force_routing(name):
    exits, _ = build(name)
    x = images(24)
    mixed_thresholds(exits, x)
    expected, index = brute_force(exits, x)
    seen, handles = count_calls(exits)
    with torch.no_grad():
        out = exits(x)
    for h in handles:
        h.remove()
    assert len(set(index)) >= 3, "thresholds should spread the samples over several exits"
    assert out.exit_index.tolist() == index
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-5)
    # Each stage ran only on the samples still in.
    remaining = len(x)
    for k, name in enumerate(exits.stage_names):
        assert seen[name] == [remaining]
        remaining -= index.count(k)
    assert seen[exits.classifier_name] == ([remaining] if remaining else [])


def test_results_come_back_in_input_order(resnet):
    exits, _ = resnet
    x = images(24)
    mixed_thresholds(exits, x)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = exits(x)
        shuffled = exits(x[perm])
    assert torch.equal(shuffled.exit_index, out.exit_index[perm])
    torch.testing.assert_close(shuffled.logits, out.logits[perm], rtol=1e-4, atol=1e-5)
    exits.set_thresholds(math.inf)


def test_no_grad_and_inference_mode_agree(resnet):
    exits, _ = resnet
    x = images(24)
    mixed_thresholds(exits, x)
    with torch.no_grad():
        a = exits(x)
    with torch.inference_mode():
        b = exits(x)
    assert torch.equal(a.exit_index, b.exit_index)
    assert torch.equal(a.logits, b.logits)
    exits.set_thresholds(math.inf)


def test_training_mode_and_removed_hooks_raise():
    exits, _ = build("resnet18")
    exits.train()
    with pytest.raises(RuntimeError, match="eval"):
        exits(images(2))
    exits.eval()
    exits.remove()
    assert all(not m._forward_hooks for m in exits.model.modules())
    exits.model(images(2))  # the plain model still works
    with pytest.raises(RuntimeError, match="removed"):
        exits(images(2))


def test_bad_thresholds_are_refused(resnet):
    exits, _ = resnet
    with pytest.raises(ValueError, match="need 3 thresholds"):
        exits.set_thresholds([0.5])
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\].*got \[-0.1, nan\]"):
        exits.set_thresholds([0.5, -0.1, float("nan")])


def test_percentages_are_refused_where_fractions_are_meant(resnet):
    # 95 for 0.95 would turn every head off, 50 for 0.5 would allow any cost: both refused,
    # naming the value, the range and the fraction meant; math.inf still disables a head.
    exits, _ = resnet
    x, targets = images(8), torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"max_cost=50 is not a fraction in \(0, 1\].*max_cost=0.5"):
        exits.calibrate((x, targets), max_cost=50)
    drop = r"max_accuracy_drop=5 is not a fraction in \[0, 1\].*max_accuracy_drop=0.05"
    with pytest.raises(ValueError, match=drop):
        exits.calibrate((x, targets), max_accuracy_drop=5)
    with pytest.raises(ValueError, match=r"\[0, 1\], or math.inf .*got \[95, 95, 95\].*\[0.95, 0.95, 0.95\]"):
        exits.set_thresholds([95, 95, 95])
    with pytest.raises(ValueError, match=r"\[0, 1\], or math.inf .*got \[2.0, 2.0, 2.0\]"):
        exits.set_thresholds(2.0)
    with pytest.raises(ValueError, match=r"levels .*got \[50, 90\]"):
        exits.tradeoff((x, targets), levels=[50, 90])
    assert exits.thresholds == (math.inf,) * 3
    exits.set_thresholds([0.0, 1.0, math.inf])
    exits.set_thresholds(math.inf)


# -- refusal of models where a later stage reads an earlier tensor ------------------------------


class CrossStage(nn.Module):
    """Four conv stages; ``link`` makes stage3 also read the stem's output (``concat``) or the
    mean over the batch (``batch-mix``)."""

    def __init__(self, link: str) -> None:
        super().__init__()
        self.link = link
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.stage3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.stem(x)
        x = self.stage2(self.stage1(x0))
        if self.link == "concat":  # a cross-stage link: shapes clash once the batch shrinks
            x = self.stage3(torch.cat([x, x0], dim=1)[:, :8])
        elif self.link == "batch-mix":  # no shape clash: only the values change
            x = self.stage3(x + x.mean(0))
        else:
            x = self.stage3(x)
        return self.fc(x.mean((2, 3)))


def cross_stage_exits(link: str) -> EarlyExitModel:
    torch.manual_seed(0)
    model = CrossStage(link)
    distiller = GradualSelfDistiller(model, ["stage1", "stage2"], example_input=torch.zeros(1, 3, 8, 8))
    return EarlyExitModel.from_distiller(distiller, example_input=torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("link", ["concat", "batch-mix"])
def test_cross_stage_models_are_refused_naming_the_stage(link):
    with pytest.raises(ValueError, match="samples cannot leave at stage 'stage1'"):
        cross_stage_exits(link)


def test_refusal_leaves_no_hooks_and_sequential_model_is_accepted():
    model = CrossStage("concat")
    distiller = GradualSelfDistiller(model, ["stage1", "stage2"], example_input=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError):
        EarlyExitModel.from_distiller(distiller, example_input=torch.zeros(1, 3, 8, 8))
    assert all(not m._forward_hooks for m in model.modules())
    exits = cross_stage_exits("none")
    assert exits.stage_names == ("stage1", "stage2")


def test_hrnet_is_refused():
    # HRNet's stages return lists (the distiller refuses them); tap tensor-valued branches, which
    # the fuse layers mix with the other resolutions' full batches.
    torch.manual_seed(0)
    model = timm.create_model("hrnet_w18_small", num_classes=3).eval()
    names = ["stage2.0.branches.0", "stage3.0.branches.0"]
    example = torch.zeros(1, 3, SIZE, SIZE)
    distiller = GradualSelfDistiller(model, names, example_input=example)
    with pytest.raises(ValueError, match="samples cannot leave at stage 'stage2.0.branches.0'"):
        EarlyExitModel.from_distiller(distiller, example_input=example)


class Twice(nn.Module):
    """A stage module called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage1(self.stage1(x)).mean((2, 3)))


def stage(name: str, element: int | None = None) -> StageInfo:
    """A hand-written NCHW stage description."""
    return StageInfo(name, (), "NCHW", None, None, 0, element)


def test_a_stage_that_runs_twice_is_refused():
    head = PooledHead(3, 3, 2, attn_layer=None)
    with pytest.raises(ValueError, match="each stage must run once"):
        EarlyExitModel(Twice(), [head], [stage("stage1")], "fc", example_input=torch.zeros(1, 3, 4, 4))


def test_stage_names_instead_of_descriptions_are_refused():
    head = PooledHead(3, 3, 2, attn_layer=None)
    with pytest.raises(TypeError, match="distiller.stages"):
        EarlyExitModel(Twice(), [head], ["stage1"], "fc")


class Pair(nn.Module):
    """Returns ``(x, extra)`` as PiT's and MViTv2's stages do; ``extra`` has the batch first too."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x.mean((2, 3))


class TupleStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.stage1 = Pair()
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, extra = self.stage1(self.conv(x))
        return self.fc(torch.cat([features.amax((2, 3)), extra], 1))


def test_tuple_stage_outputs_exit_with_every_element_shrunk():
    torch.manual_seed(0)
    model = TupleStage().eval()
    head = PooledHead(4, 4, 2, attn_layer=None).eval()
    exits = EarlyExitModel(
        model, [head], [stage("stage1", element=0)], "fc", example_input=torch.zeros(1, 3, 4, 4)
    )
    images = torch.randn(6, 3, 4, 4)
    with torch.no_grad():
        head_logits = head(model.conv(images))[0]
        confidence = head_logits.softmax(-1).amax(-1)
        exits.set_thresholds([confidence.median().item()])
        out = exits(images)
        leave = confidence >= exits.thresholds[0]
    assert 0 < int(leave.sum()) < len(images)
    assert out.exit_index.tolist() == [0 if gone else 1 for gone in leave.tolist()]
    torch.testing.assert_close(out.logits[leave], head_logits[leave])
    torch.testing.assert_close(out.logits[~leave], model(images[~leave]))


class FoldingPair(nn.Module):
    """Returns ``(x, pixels)`` where ``pixels`` folds the positions into the first axis (as TNT's
    pixel embeddings do), so it cannot be cut by sample."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class FoldingTupleStage(TupleStage):
    def __init__(self) -> None:
        super().__init__()
        self.stage1 = FoldingPair()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, pixels = self.stage1(self.conv(x))
        return self.fc(features.mean((2, 3)) + pixels.reshape(features.shape[0], -1, 4).mean(1))


def test_a_tuple_stage_with_a_folded_batch_is_refused():
    head = PooledHead(4, 4, 2, attn_layer=None)
    with pytest.raises(ValueError, match="samples cannot leave at stage 'stage1'"):
        EarlyExitModel(
            FoldingTupleStage(),
            [head],
            [stage("stage1", element=0)],
            "fc",
            example_input=torch.zeros(1, 3, 4, 4),
        )


# -- calibration -------------------------------------------------------------------------------


def test_choose_thresholds_on_a_known_case():
    # One head; confidences descending. The head is right on the 4 most confident samples and
    # on the sixth; the classifier is always right. Exiting costs 1, the classifier 10.
    confidence = torch.tensor([[0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]])
    head_right = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    correct = torch.stack([head_right, torch.ones(10, dtype=torch.bool)])
    costs = ExitCosts(stages=(1.0,), heads=(0.0,), full=10.0)
    # No loss allowed: take exactly the four sure ones.
    assert choose_thresholds(confidence, correct, costs, 0.0) == [pytest.approx(0.8)]
    # One mistake in ten allowed: the sixth sample comes too (at the price of the fifth).
    assert choose_thresholds(confidence, correct, costs, 0.1) == [pytest.approx(0.6)]
    # Everything allowed: every sample leaves at the head.
    assert choose_thresholds(confidence, correct, costs, 1.0) == [pytest.approx(0.2)]
    # A head that costs more than it saves is left off.
    dear = ExitCosts(stages=(1.0,), heads=(20.0,), full=10.0)
    assert choose_thresholds(confidence, correct, dear, 1.0) == [math.inf]


def test_every_exit_counts_its_own_head_even_when_disabled():
    # As the trade-off curve and the forced-exit latency do: answering at a disabled exit runs
    # its head, not the disabled heads before it; the classifier pays for the enabled heads.
    costs = ExitCosts(stages=(1.0, 3.0), heads=(0.5, 0.25), full=10.0)
    assert costs.per_exit([math.inf, math.inf]).tolist() == [1.5, 3.25, 10.0]
    assert costs.per_exit([0.5, math.inf]).tolist() == [1.5, 3.75, 10.5]
    assert costs.per_exit([math.inf, 0.5]).tolist() == [1.5, 3.25, 10.25]
    assert costs.per_exit([0.5, 0.5]).tolist() == [1.5, 3.75, 10.75]


def test_calibrate_keeps_the_accuracy_it_promises(resnet):
    exits, plain = resnet
    x = images(48, seed=5)
    with torch.no_grad():
        targets = plain(x).argmax(-1)  # the full model is right on every sample
    targets[:6] = (targets[:6] + 1) % 5  # ... but six
    summary = exits.calibrate((x, targets), max_accuracy_drop=0.1)
    assert summary["thresholds"] == list(exits.thresholds)
    with torch.no_grad():
        out = exits(x)
    accuracy = (out.logits.argmax(-1) == targets).double().mean().item()
    assert accuracy == pytest.approx(summary["accuracy"])
    assert summary["full_accuracy"] == pytest.approx(42 / 48)
    assert accuracy >= 42 / 48 - 0.1 - 1e-9
    assert summary["flops_ratio"] < 1.0
    exits.set_thresholds(math.inf)


def test_calibrate_within_a_budget_keeps_it(resnet):
    exits, plain = resnet
    x = images(48, seed=5)
    with torch.no_grad():
        targets = plain(x).argmax(-1)
    targets[:6] = (targets[:6] + 1) % 5
    try:
        summary = exits.calibrate((x, targets), max_cost=0.6)
        with torch.no_grad():
            out = exits(x)
        costs = exits.exit_costs(x[:1])
        spent = costs.per_exit(exits.thresholds)[out.exit_index].mean().item() / costs.full
        assert spent == pytest.approx(summary["flops_ratio"]) and spent <= 0.6
        accuracy = (out.logits.argmax(-1) == targets).double().mean().item()
        assert accuracy == pytest.approx(summary["accuracy"])
        assert summary["accuracy_drop"] == pytest.approx(summary["full_accuracy"] - accuracy)
        with pytest.raises(ValueError, match="not both"):
            exits.calibrate((x, targets), max_accuracy_drop=0.01, max_cost=0.5)
        with pytest.raises(ValueError, match="below the cheapest answer"):
            exits.calibrate((x, targets), max_cost=0.01)
    finally:
        exits.set_thresholds(math.inf)


def test_budget_search_finds_the_best_accuracy_of_one_head():
    # One head; exiting costs 1, the classifier 10 (11 with the head on the way). Within a mean
    # cost of 5.5 at most 4 of 10 samples may go on, so the head answers the six most confident
    # and is wrong on one of them (0.7): 9 of 10.
    confidence = torch.tensor([[0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]])
    head_right = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0, 1, 1], dtype=torch.bool)
    correct = torch.stack([head_right, torch.ones(10, dtype=torch.bool)])
    costs = ExitCosts((0.0,), (1.0,), 10.0)
    thresholds = choose_thresholds_within_cost(confidence, correct, costs, max_cost=0.55)
    accuracy, cost = evaluate(confidence, correct, costs, thresholds)
    assert cost <= 5.5
    # Brute force over every threshold: a single head's exits are the samples at or above it.
    best = max(
        evaluate(confidence, correct, costs, [t])[0]
        for t in [*confidence[0].tolist(), math.inf]
        if evaluate(confidence, correct, costs, [t])[1] <= 5.5
    )
    assert accuracy == best == pytest.approx(0.9)


@pytest.mark.parametrize("method", ["calibrate", "tradeoff", "profile"])
def test_targets_outside_the_classes_are_refused(resnet, method):
    exits, _ = resnet
    x = images(8, seed=5)
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    options = {"repeats": 1, "latency_images": 2, "batch_sizes": (1,)} if method == "profile" else {}
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 4\] for 5 classes"):
        getattr(exits, method)((x, targets), **options)
    with pytest.raises(TypeError, match="class indices"):
        getattr(exits, method)((x, torch.rand(8, 5)), **options)
    assert exits.thresholds == (math.inf,) * 3


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 30),
    st.lists(st.floats(0, 1.2), min_size=4, max_size=4),
    st.integers(0, 2**31 - 1),
)
def test_route_matches_a_loop(heads, n, thresholds, seed):
    confidence = torch.rand(heads, n, generator=torch.Generator().manual_seed(seed))
    expected = [next((k for k in range(heads) if confidence[k, i] >= thresholds[k]), heads) for i in range(n)]
    assert route(confidence, thresholds[:heads]).tolist() == expected


def test_expected_calibration_error_matches_a_loop():
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(200, 4, generator=generator).softmax(-1)
    targets = torch.randint(0, 4, (200,), generator=generator)
    confidence, predicted = probs.max(1)
    total = 0.0
    for b in range(10):
        low, high = b / 10, (b + 1) / 10
        members = [i for i in range(200) if low < confidence[i] <= high]
        if members:
            gap = sum(float(confidence[i]) - float(predicted[i] == targets[i]) for i in members)
            total += abs(gap)
    assert expected_calibration_error(probs, targets, bins=10) == pytest.approx(total / 200)


def test_profile_reports_every_exit(resnet):
    exits, _ = resnet
    x = images(24)
    mixed_thresholds(exits, x)
    targets = torch.randint(0, 5, (24,), generator=torch.Generator().manual_seed(0))
    loader = list(zip(x.split(8), targets.split(8)))
    table = exits.profile(loader, batch_sizes=(1, 8), repeats=1, latency_images=2)
    with torch.no_grad():
        out = exits(x)
    rows = table["exits"]
    assert [r["exit"] for r in rows] == [*exits.stage_names, exits.classifier_name]
    for k, row in enumerate(rows):
        assert row["share"] == pytest.approx((out.exit_index == k).double().mean().item())
        assert set(row["latency_ratio"]) == {1, 8}
    assert table["accuracy"] == pytest.approx((out.logits.argmax(-1) == targets).double().mean().item())
    flops = [r["flops"] for r in rows]
    assert flops == sorted(flops)
    assert table["flops"] == pytest.approx(sum(r["share"] * r["flops"] for r in rows))
    exits.set_thresholds(math.inf)


@pytest.mark.parametrize("latency_images, batches", [(4, 1), (20, 2), (24, 3)])
def test_profile_times_every_whole_batch(resnet, latency_images, batches):
    """At a batch size above 1, latency covers the whole batches within ``latency_images`` (at
    least one): which images a batch holds decides how many leave early."""
    exits, _ = resnet
    x = images(24)
    loader = [(x, torch.zeros(24, dtype=torch.long))]
    timed = set()  # the distinct 8-image inputs the stem saw
    stem = exits.model.conv1.register_forward_pre_hook(
        lambda m, a: timed.add(a[0].data_ptr()) if a[0].shape[0] == 8 else None
    )
    try:
        exits.profile(loader, batch_sizes=(8,), repeats=1, latency_images=latency_images)
    finally:
        stem.remove()
    assert len(timed) == batches


# -- saving and loading ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head_factory",
    [None, partial(PooledHead, attn_layer=None), partial(BottleneckHead, pool_size=2)],
    ids=["bottleneck-acam", "pooled", "bottleneck-pool2"],
)
def test_state_dict_and_saved_files_round_trip(tmp_path, head_factory):
    exits, _ = build("resnet18", head_factory)
    x = images(24)
    mixed_thresholds(exits, x)
    with torch.no_grad():
        expected = exits(x)
    other, _ = build("resnet18", head_factory, seed=7)
    other.load_state_dict(exits.state_dict())
    assert other.thresholds == exits.thresholds
    exits.save(tmp_path)
    torch.manual_seed(9)
    user_model = timm.create_model("resnet18", num_classes=5)  # the user's own constructor
    loaded = EarlyExitModel.load(tmp_path, user_model, example_input=torch.zeros(1, 3, SIZE, SIZE))
    assert loaded.thresholds == exits.thresholds
    assert loaded.stages == exits.stages
    assert [getattr(h, "pool_size", None) for h in loaded.heads] == [
        getattr(h, "pool_size", None) for h in exits.heads
    ]
    for rebuilt in (other, loaded):
        with torch.no_grad():
            out = rebuilt(x)
        assert torch.equal(out.exit_index, expected.exit_index)
        assert torch.equal(out.logits, expected.logits)


def test_folders_saved_by_version_0_2_still_load(tmp_path):
    exits, _ = build("resnet18")
    exits.save(tmp_path)
    config = json.loads((tmp_path / "early_exit.json").read_text())
    stages = config.pop("stages")
    config["stage_names"] = [s["name"] for s in stages]
    config["layouts"] = [s["layout"] for s in stages]
    config["num_prefix_tokens"] = [s["num_prefix_tokens"] for s in stages]
    (tmp_path / "early_exit.json").write_text(json.dumps(config))
    loaded = EarlyExitModel.load(tmp_path, timm.create_model("resnet18", num_classes=5))
    assert loaded.stage_names == exits.stage_names and loaded.layouts == exits.layouts
    x = images(4)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, exits(x).logits)


def test_load_asks_for_heads_it_cannot_rebuild(tmp_path):
    exits, _ = build("resnet18", partial(PooledHead, attn_layer=partial(nn.Dropout, 0.0)))
    exits.save(tmp_path)
    with pytest.raises(ValueError, match="pass heads="):
        EarlyExitModel.load(tmp_path, timm.create_model("resnet18", num_classes=5))


def test_load_into_another_architecture_says_what_differs(tmp_path):
    exits, _ = build("resnet18")
    exits.save(tmp_path)
    with pytest.raises(RuntimeError, match=r"model.pt does not fit this ResNet: 96 of its 218") as info:
        EarlyExitModel.load(tmp_path, timm.create_model("resnet34", num_classes=5))
    assert "'layer1.2.conv1.weight'" in str(info.value)  # resnet34 has three blocks in layer1
    assert "as trained (stages ['layer1', 'layer2', 'layer3'], classifier 'fc';" in str(info.value)
    assert "Missing key(s)" not in str(info.value)
    shape = r"2 differ in shape \(e.g. 'fc.weight': saved \(5, 512\), here \(7, 512\)"
    with pytest.raises(RuntimeError, match=shape):
        EarlyExitModel.load(tmp_path, timm.create_model("resnet18", num_classes=7))
    heads = [PooledHead(c, c, 5) for c in (64, 128, 256)]
    with pytest.raises(RuntimeError, match=r"heads.pt does not fit this ModuleList: .*pass heads built"):
        EarlyExitModel.load(tmp_path, timm.create_model("resnet18", num_classes=5), heads)


def test_calibrate_and_profile_show_progress_when_asked_or_on_a_terminal(resnet, capsys, monkeypatch):
    exits, _ = resnet
    thresholds = exits.thresholds
    x, targets = images(24), torch.zeros(24, dtype=torch.long)
    exits.calibrate((x, targets), progress=True)
    assert "calibrate:   0%|" in capsys.readouterr().err
    exits.profile([(x, targets)], batch_sizes=(8,), repeats=2, latency_images=8, progress=True)
    err = capsys.readouterr().err
    assert "profile: exit logits:   0%|" in err and "profile: latency at batch 8:   0%|" in err
    exits.calibrate((x, targets))  # stderr is not a terminal under pytest's capture
    exits.calibrate((x, targets), progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm not installed: no bar and no error
    exits.calibrate((x, targets), progress=True)
    assert capsys.readouterr().err == ""
    exits.set_thresholds(thresholds)


def test_tradeoff_matches_real_forward_passes(resnet):
    exits, plain = resnet
    x = images(24)
    targets = torch.randint(0, 5, (24,), generator=torch.Generator().manual_seed(0))
    levels = [0.0, 0.5, 0.9, math.inf]
    curve = exits.tradeoff((x, targets), levels)
    costs = exits.exit_costs(x[:1])
    assert [p["threshold"] for p in curve] == levels
    for point in curve:
        exits.set_thresholds(point["threshold"])
        with torch.no_grad():
            out = exits(x)
        accuracy = (out.logits.argmax(-1) == targets).double().mean().item()
        per_exit = costs.per_exit(exits.thresholds)
        assert point["accuracy"] == pytest.approx(accuracy)
        assert point["flops_ratio"] == pytest.approx(per_exit[out.exit_index].mean().item() / costs.full)
    assert curve[-1]["flops_ratio"] == 1.0
    with torch.no_grad():
        assert curve[-1]["accuracy"] == pytest.approx((plain(x).argmax(-1) == targets).double().mean().item())
    exits.set_thresholds(math.inf)


def test_exit_costs_add_up(resnet):
    exits, _ = resnet
    costs = exits.exit_costs(images(1))
    stages = list(costs.stages)
    assert stages == sorted(stages) and stages[-1] < costs.full
    assert all(h > 0 for h in costs.heads)
    # The first stage's cost, counted independently on the plain model's own modules.
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m = exits.model
        m.layer1(m.maxpool(m.act1(m.bn1(m.conv1(images(1))))))
    assert costs.stages[0] == counter.get_total_flops()


def test_float64_routing_matches_brute_force_tightly():
    exits, plain = build("resnet18")
    exits.double()
    plain.double()
    x = images(24).double()
    with torch.no_grad():
        assert torch.equal(exits(x).logits, plain(x))
    mixed_thresholds(exits, x)
    expected, index = brute_force(exits, x)
    with torch.no_grad():
        out = exits(x)
    assert out.logits.dtype == torch.float64
    assert out.exit_index.tolist() == index
    torch.testing.assert_close(out.logits, expected, rtol=1e-10, atol=1e-12)
