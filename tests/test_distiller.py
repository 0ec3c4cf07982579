"""GradualSelfDistiller on timm families and hand-written models: outputs, losses, hygiene."""

import copy
import gc
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import timm
import torch
import torchvision
from torch import nn

from gradual_sd import (
    BottleneckHead,
    GradualDistillationLoss,
    GradualSelfDistiller,
    PooledHead,
    default_stage_names,
)
from gradual_sd._finite import FiniteCheck

FAMILIES = {
    # name: (create_model kwargs, input size, expected default stages, expected layout)
    "resnet18": ({}, 64, ["layer1", "layer2", "layer3"], "NCHW"),
    "efficientnet_b0": ({}, 64, ["blocks.1", "blocks.2", "blocks.4"], "NCHW"),
    "convnext_atto": ({}, 64, ["stages.0", "stages.1", "stages.2"], "NCHW"),
    "vit_tiny_patch16_224": ({"img_size": 64, "depth": 4}, 64, ["blocks.0", "blocks.1", "blocks.2"], "NLC"),
    "swin_tiny_patch4_window7_224": (
        {"img_size": 64, "window_size": 4, "depths": (1, 1, 1, 1)},
        64,
        ["layers.0", "layers.1", "layers.2"],
        "NHWC",
    ),
}


def make(name, num_classes=5):
    kwargs, size, _, _ = FAMILIES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes, **kwargs)
    return model, torch.zeros(1, 3, size, size)


def batch(size=64, n=3, classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen), torch.randint(0, classes, (n,), generator=gen)


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_family_trains_and_matches_model(name):
    model, example = make(name)
    _, size, stages, layout = FAMILIES[name]
    distiller = GradualSelfDistiller(model, example_input=example)
    assert list(distiller.stage_names) == stages == default_stage_names(model)
    assert set(distiller.layouts) == {layout}
    assert distiller.hidden_size == model.head_hidden_size

    images, targets = batch(size)
    out = distiller.train()(images, targets)
    assert len(out.head_logits) == len(stages) + 1 and out.head_logits[-1] is out.logits
    assert all(z.shape == (3, 5) for z in out.head_logits)
    assert all(f.shape == (3, 128) for f in out.head_features)
    assert set(out.losses) == {"ce"} | {f"{k}/{s}" for s in stages for k in ("kl", "feature")}
    out.loss.backward()
    missing = [n for n, p in distiller.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing

    distiller.eval()
    with torch.no_grad():
        torch.testing.assert_close(distiller(images).logits, model(images), rtol=0, atol=0)


def test_token_stages_drop_prefix_tokens():
    model, example = make("vit_tiny_patch16_224")
    distiller = GradualSelfDistiller(model, example_input=example)
    assert distiller.num_prefix_tokens == (model.num_prefix_tokens,) * 3 == (1, 1, 1)
    seen = []
    distiller.heads[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    distiller.train()(*batch(64))
    assert seen == [(3, 192, 16, 1)]  # 4x4 patches, class token dropped, as an (N, C, L, 1) map


def test_heads_see_the_stage_outputs():
    """Recompute ResNet's stages by hand and run the heads on them: same head logits."""
    model, example = make("resnet18")
    distiller = GradualSelfDistiller(model, example_input=example).eval()
    images, _ = batch()
    out = distiller(images, run_heads=True)
    expected = []
    with torch.no_grad():
        x = model.maxpool(model.act1(model.bn1(model.conv1(images))))
        for head, layer in zip(distiller.heads, (model.layer1, model.layer2, model.layer3)):
            x = layer(x)
            expected.append(head(x)[0])
    for got, want in zip(out.head_logits, expected):
        torch.testing.assert_close(got, want)


class TinyCNN(nn.Module):
    """A plain PyTorch CNN with no timm conventions."""

    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(12, 20, 3, 2, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(20, classes)

    def forward(self, x):
        return self.classifier(self.pool(self.block2(self.block1(self.stem(x)))).flatten(1))


def test_hand_written_cnn_infers_channels_and_classifier():
    model = TinyCNN()
    distiller = GradualSelfDistiller(model, ["stem", "block1"], example_input=torch.zeros(1, 3, 32, 32))
    assert distiller.classifier_name == "classifier"
    assert distiller.hidden_size == 20 and distiller.num_classes == 4
    assert [h.conv.in_channels for h in distiller.heads] == [8, 12]
    out = distiller(torch.randn(2, 3, 48, 40), torch.tensor([0, 3]))  # another input size
    out.loss.backward()
    assert all(p.grad is not None for p in distiller.parameters())


def test_torchvision_resnet_with_default_probe_input():
    model = torchvision.models.resnet18(num_classes=7)
    distiller = GradualSelfDistiller(model, ["layer1", "layer2", "layer3"], head_factory=PooledHead)
    assert distiller.classifier_name == "fc" and distiller.hidden_size == 512
    out = distiller(torch.randn(2, 3, 32, 32), torch.tensor([1, 6]))
    out.loss.backward()


def test_teacher_is_detached_in_the_model():
    """The last pair's terms move the third head but not the model's classifier."""
    model, example = make("resnet18")
    distiller = GradualSelfDistiller(model, example_input=example)
    out = distiller(*batch())
    pair = out.losses["kl/layer3"] + out.losses["feature/layer3"]
    params = [model.fc.weight, model.layer4[0].conv1.weight, distiller.heads[2].fc.weight]
    grads = torch.autograd.grad(pair, params, allow_unused=True)
    assert grads[0] is None and grads[1] is None
    assert grads[2].abs().sum() > 0


def test_loss_equals_independent_loss_on_head_outputs():
    model, example = make("resnet18")
    loss = GradualDistillationLoss(temperature=2.0, kl_weight=0.5, feature_weight=0.1, teacher="deepest")
    distiller = GradualSelfDistiller(model, loss=loss, example_input=example)
    images, targets = batch()
    out = distiller(images, targets)
    z, f = out.head_logits, out.head_features
    expected = torch.nn.functional.cross_entropy(z[-1], targets)
    for s in range(3):
        p_t = torch.softmax(z[-1].detach() / 2.0, 1)
        expected = expected + 0.5 * -(p_t * torch.log_softmax(z[s] / 2.0, 1)).sum(1).mean()
        expected = expected + 0.1 * (f[s] - f[-1].detach()).pow(2).sum().sqrt()
    torch.testing.assert_close(out.loss, expected)


def test_eval_and_no_targets_skip_the_heads():
    model, example = make("resnet18")
    distiller = GradualSelfDistiller(model, example_input=example)
    calls = []
    for head in distiller.heads:
        head.register_forward_hook(lambda *a: calls.append(1))
    images, targets = batch()
    out = distiller.train()(images)
    assert out.loss is None and out.head_logits == () and not calls
    distiller.eval()
    out = distiller(images, targets)
    assert not calls and set(out.losses) == {"ce"}
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, targets))
    out = distiller(images, run_heads=True)
    assert len(calls) == 3 and len(out.head_logits) == 4 and out.loss is None


def test_export_returns_the_plain_model_without_hooks():
    model, example = make("resnet18")
    reference = copy.deepcopy(model).eval()
    distiller = GradualSelfDistiller(model, example_input=example)
    distiller(*batch())
    exported = distiller.export()
    assert exported is model
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in exported.modules())
    assert set(exported.state_dict()) == set(reference.state_dict())
    exported.eval()
    images, _ = batch()
    reference.load_state_dict(exported.state_dict())
    torch.testing.assert_close(exported(images), reference(images), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="hooks were removed"):
        distiller(images)


def test_context_manager_removes_hooks():
    model = TinyCNN()
    with GradualSelfDistiller(model, ["stem"], example_input=torch.zeros(1, 3, 16, 16)) as distiller:
        assert distiller.attached
        assert model.stem._forward_hooks
    assert not distiller.attached
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_no_stage_tensors_outlive_the_forward():
    model, example = make("resnet18")
    distiller = GradualSelfDistiller(model, example_input=example)
    refs = []
    model.layer2.register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
    out = distiller(*batch())
    out.loss.backward()
    assert distiller.taps._store == {}
    del out
    gc.collect()
    assert refs and refs[0]() is None
    # A plain call of the wrapped model records nothing either.
    model(batch()[0])
    assert distiller.taps._store == {}


def test_captures_are_kept_per_device():
    model = TinyCNN()
    distiller = GradualSelfDistiller(model, ["stem"], example_input=torch.zeros(1, 3, 16, 16))
    other = distiller.taps.start("cuda:1")  # what a DataParallel replica on another device holds
    mine = distiller.taps.start("cpu")
    model(torch.zeros(1, 3, 16, 16))
    distiller.taps.stop("cpu")
    distiller.taps.stop("cuda:1")
    assert set(mine) == {"stem", "classifier"} and other == {}


def test_state_dict_round_trip():
    model, example = make("resnet18")
    distiller = GradualSelfDistiller(model, example_input=example)
    distiller(*batch()).loss.backward()
    state = distiller.state_dict()
    assert "teacher_projection_weight" in state and any(k.startswith("heads.0.") for k in state)
    clone_model, _ = make("resnet18")
    torch.manual_seed(123)  # different head init
    clone = GradualSelfDistiller(clone_model, example_input=example)
    clone.load_state_dict(state)
    distiller.eval()
    clone.eval()
    images, _ = batch(seed=5)
    a, b = distiller(images, run_heads=True), clone(images, run_heads=True)
    for x, y in zip(a.head_logits + a.head_features, b.head_logits + b.head_features):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_checkpointed_heads_give_the_same_gradients_and_statistics():
    model, example = make("resnet18")
    plain = GradualSelfDistiller(model, example_input=example)
    recomputed = copy.deepcopy(plain)
    recomputed.checkpoint_heads = True
    images, targets = batch()
    plain(images, targets).loss.backward()
    recomputed(images, targets).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, a), b in zip(plain.named_buffers(), recomputed.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_gradient_checkpointing_is_refused():
    model, example = make("resnet18")
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="set_grad_checkpointing"):
        GradualSelfDistiller(model, example_input=example)
    model.set_grad_checkpointing(False)
    distiller = GradualSelfDistiller(model, example_input=example)
    model.set_grad_checkpointing(True)
    with pytest.raises(RuntimeError, match="did not run.*checkpointing"):
        distiller(*batch())


def test_non_finite_loss_names_the_culprits():
    model, example = make("resnet18")
    distiller = GradualSelfDistiller(model, example_input=example)
    model.layer2[0].conv1.register_forward_hook(lambda m, a, out: out * float("nan"))
    with pytest.raises(FloatingPointError, match="step 0") as error:
        distiller(*batch())
    message = str(error.value)
    assert "logits of layer2, logits of layer3, logits of fc" in message
    assert "logits of layer1" not in message and "features of layer1" not in message
    assert "term ce" in message and "loss" in message


def test_deferred_finite_check_raises_at_a_later_step_naming_the_bad_one():
    """The CUDA path without a GPU: flags are read one step late, and name the step that
    produced them; flush() reads the last one."""
    model, example = make("resnet18")
    distiller = GradualSelfDistiller(model, example_input=example)
    distiller.finite_check.deferred = True
    poison = {"on": False}
    model.layer3.register_forward_hook(lambda m, a, out: out * float("nan") if poison["on"] else out)
    distiller(*batch())  # step 0, finite
    poison["on"] = True
    distiller(*batch())  # step 1, non-finite: not read yet
    poison["on"] = False
    with pytest.raises(FloatingPointError, match=r"step 1: .*logits of fc"):
        distiller(*batch())  # step 2 reads step 1
    poison["on"] = True
    distiller(*batch())  # step 3
    with pytest.raises(FloatingPointError, match="step 3"):
        distiller.finite_check.flush()


@pytest.mark.parametrize("deferred", [False, True])
def test_finite_check_conditions_raise_value_errors(deferred):
    """Extra conditions (the distiller's accelerator target-range flag) share the flags: alone
    they raise ValueError, with a non-finite value FloatingPointError; both name the step."""
    check = FiniteCheck(deferred=deferred)
    ok, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    labels = lambda: ["loss", "targets in range"]  # noqa: E731
    check.submit([ok], labels, [torch.tensor(True)])  # step 0: fine
    with pytest.raises(ValueError, match=r"bad inputs at training step 1: targets in range$"):
        check.submit([ok], labels, [torch.tensor(False)])
        check.flush()  # where the deferred check reads step 1
    with pytest.raises(FloatingPointError, match=r"values at training step 2: loss, targets in range$"):
        check.submit([nan], labels, [torch.tensor(False)])
        check.flush()


def test_copies_of_a_distiller_start_with_no_pending_checks():
    model, example = make("resnet18")
    distiller = GradualSelfDistiller(model, example_input=example)
    distiller.finite_check.deferred = True
    model.layer3.register_forward_hook(lambda m, a, out: out * float("nan"))
    distiller(*batch())
    twin = copy.deepcopy(distiller)
    twin.finite_check.flush()  # nothing pending in the copy
    with pytest.raises(FloatingPointError, match="step 0"):
        distiller.finite_check.flush()


def test_finite_check_can_be_turned_off():
    model, example = make("resnet18")
    distiller = GradualSelfDistiller(model, example_input=example, check_finite=False)
    assert distiller.finite_check is None
    model.layer2.register_forward_hook(lambda m, a, out: out * float("nan"))
    assert not torch.isfinite(distiller(*batch()).loss)


def test_check_finite_is_honoured_when_switched_after_construction():
    model, example = make("resnet18")
    distiller = GradualSelfDistiller(model, example_input=example, check_finite=False)
    model.layer2.register_forward_hook(lambda m, a, out: out * float("nan"))
    distiller.check_finite = True
    with pytest.raises(FloatingPointError, match="step 0"):
        distiller(*batch())
    distiller.check_finite = False
    assert distiller.finite_check is None and not torch.isfinite(distiller(*batch()).loss)


def test_pre_logits_are_what_the_classifier_reads():
    """The distiller's output carries the pre-logits it captured (the as-shipped example's
    trainable projection reads them): timm's forward_head(..., pre_logits=True)."""
    model, example = make("resnet18")
    distiller = GradualSelfDistiller(model, example_input=example).eval()
    images, targets = batch()
    with torch.no_grad():
        out = distiller(images, targets, run_heads=True)
        expected = model.forward_head(model.forward_features(images), pre_logits=True)
    assert torch.equal(out.pre_logits, expected)
    assert distiller(images).pre_logits is None  # the heads did not run


class TupleStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize(
    "stages, kwargs, error, match",
    [
        (["layer5"], {}, KeyError, r"ResNet has no submodule 'layer5'; close matches: \['layer4', 'layer3'"),
        (["layer1", "layer1"], {}, ValueError, r"lists \['layer1'\] more than once"),
        (["layer2", "layer1"], {}, ValueError, r"ran as \['layer1', 'layer2'\]"),
        (["global_pool"], {}, ValueError, r"stage 'global_pool' outputs a tensor of shape \(1, 512\)"),
        (["fc"], {}, ValueError, "is the model's classifier"),
        ([], {}, ValueError, "stage_names is empty"),
        (
            ["layer1"],
            {"num_classes": 7},
            ValueError,
            "num_classes=7 but the model's classifier 'fc' outputs 5",
        ),
        (
            ["layer1"],
            {"stage_layout": "NWHC"},
            ValueError,
            r"stage_layout must be one of \('NCHW', 'NHWC', 'NLC', 'NCL'\)",
        ),
        (["layer1"], {"feature_dim": 0}, ValueError, "feature_dim must be a positive int"),
    ],
)
def test_bad_configuration_is_refused_at_construction(stages, kwargs, error, match):
    model, example = make("resnet18")
    with pytest.raises(error, match=match):
        GradualSelfDistiller(model, stages, example_input=example, **kwargs)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_models_without_feature_info_get_stages_from_shapes():
    """Per resolution, the module that finishes it; the deepest feeds the classifier. With only
    one deeper resolution before it, the stem (reduction 2) gets a head too: a plain CNN of
    three resolutions gets two heads, not one."""
    distiller = GradualSelfDistiller(TinyCNN(), example_input=torch.zeros(1, 3, 32, 32))
    assert distiller.stage_names == ("stem", "block1")


def test_classifier_must_exist():
    model = timm.create_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="num_classes > 0"):
        GradualSelfDistiller(model, ["layer1"], example_input=torch.zeros(1, 3, 32, 32))


def test_bad_targets_are_reported():
    model, example = make("resnet18")
    distiller = GradualSelfDistiller(model, example_input=example)
    images, _ = batch()
    with pytest.raises(ValueError, match=r"\[0, 4\] for 5 classes"):
        distiller(images, torch.tensor([0, 1, 9]))
    with pytest.raises(TypeError, match="integer tensor"):
        distiller(images, torch.tensor([0, 1, 2], dtype=torch.complex64))


def test_custom_head_factory_is_called_with_stage_widths():
    model, example = make("resnet18")
    calls = []

    def factory(**kwargs):
        calls.append(kwargs)
        return BottleneckHead(**kwargs, attn_layer=None)

    GradualSelfDistiller(model, feature_dim=32, head_factory=factory, example_input=example)
    assert calls == [
        {"in_channels": c, "hidden_size": 512, "num_classes": 5, "feature_dim": 32} for c in (64, 128, 256)
    ]


@given(
    n=st.integers(2, 4),  # BatchNorm in training needs two values per channel
    height=st.integers(8, 40),
    width=st.integers(8, 40),
    classes=st.integers(2, 6),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
@settings(max_examples=20, deadline=None)
def test_any_input_size_batch_and_dtype(n, height, width, classes, dtype):
    torch.manual_seed(0)
    model = TinyCNN(classes).to(dtype)
    distiller = GradualSelfDistiller(
        model, ["stem", "block1", "block2"], example_input=torch.zeros(1, 3, 16, 16, dtype=dtype)
    )
    images = torch.randn(n, 3, height, width, dtype=dtype)
    targets = torch.arange(n) % classes
    out = distiller.train()(images, targets)
    assert [z.shape for z in out.head_logits] == [(n, classes)] * 4
    assert all(z.dtype == dtype for z in out.head_logits) and torch.isfinite(out.loss)
    out.loss.backward()
    distiller.eval()
    torch.testing.assert_close(distiller(images).logits, model(images), rtol=0, atol=0)


def test_frozen_early_stages_still_train_their_heads():
    """Fine-tuning often freezes the stem and first stage; their outputs then carry no
    gradient, but the heads on them must still train."""
    model, example = make("resnet18")
    for module in (model.conv1, model.bn1, model.layer1):
        module.requires_grad_(False)
    distiller = GradualSelfDistiller(model, example_input=example)
    distiller(*batch()).loss.backward()
    assert all(p.grad is not None for p in distiller.heads[0].parameters())
    assert model.layer1[0].conv1.weight.grad is None and model.layer2[0].conv1.weight.grad is not None
