"""Input validation of the library: soft targets, label smoothing and image batches get errors
that name the input and the fix, instead of a wrong loss or a kernel's message."""

import math

import pytest
import timm
import torch

from gradual_sd import GradualDistillationLoss, GradualSelfDistiller


def heads(n=4, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = [torch.randn(n, classes, generator=gen) for _ in range(3)]
    features = [torch.randn(n, 8, generator=gen) for _ in range(3)]
    return logits, features


@pytest.mark.parametrize(
    ("targets", "what"),
    [
        (torch.tensor([[1.5, -0.5, 0.0]] * 4), "values from -0.5"),  # negative, sums to 1
        (torch.tensor([[2.0, 1.0, 1.0]] * 4), "row sums from 4"),  # unnormalised
        (torch.tensor([[float("nan"), 0.5, 0.5]] * 4), "finite"),
    ],
)
def test_bad_soft_targets_are_refused(targets, what):
    logits, features = heads()
    with pytest.raises(ValueError, match=what):
        GradualDistillationLoss()(logits, features, targets)
    with pytest.raises(ValueError, match="soft targets must be finite, non-negative probabilities"):
        GradualDistillationLoss().cross_entropy(logits[-1], targets)


def test_valid_soft_targets_pass_within_tolerance():
    logits, features = heads()
    targets = torch.softmax(torch.randn(4, 3), 1) * (1 + 5e-5)
    loss, _ = GradualDistillationLoss()(logits, features, targets)
    assert torch.isfinite(loss)
    half = torch.softmax(torch.randn(4, 3), 1).half()  # rounding of float16 stays within 1e-2
    GradualDistillationLoss().cross_entropy(logits[-1], half)


@pytest.mark.parametrize("value", [-0.5, 1.0, math.nan, math.inf])
def test_label_smoothing_outside_zero_one_is_refused(value):
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\)"):
        GradualDistillationLoss(label_smoothing=value)


@pytest.fixture
def distiller():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    return GradualSelfDistiller(model, example_input=torch.zeros(2, 3, 32, 32))


@pytest.mark.parametrize(
    ("dtype", "fix"),
    [(torch.uint8, r"images.float\(\)"), (torch.int64, r"images.float\(\)"), (torch.float64, "images.to")],
)
def test_image_dtypes_the_model_cannot_take_name_the_fix(distiller, dtype, fix):
    images = torch.zeros(2, 3, 32, 32, dtype=dtype)
    with pytest.raises(TypeError, match=f"images are {dtype}.*{fix}"):
        distiller(images, torch.tensor([0, 1]))


def test_empty_batch_is_named(distiller):
    with pytest.raises(ValueError, match=r"empty batch \(images of shape \(0, 3, 32, 32\)\)"):
        distiller(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))


def test_batch_of_one_in_training_mode_names_batchnorm_and_the_fix(distiller):
    with pytest.raises(ValueError, match=r"a batch of 1 image\(s\) in training mode.*drop_last=True"):
        distiller(torch.zeros(1, 3, 32, 32), torch.tensor([0]))
    distiller.eval()
    assert distiller(torch.zeros(1, 3, 32, 32)).logits.shape == (1, 3)


def test_batch_of_one_trains_where_every_batchnorm_sees_several_values(distiller):
    out = distiller(torch.randn(1, 3, 64, 64), torch.tensor([2]))  # the last maps are 2x2
    assert torch.isfinite(out.loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bad_soft_targets_on_cuda_are_reported_later_without_a_sync(distiller):
    module = distiller.cuda()
    images = torch.randn(4, 3, 32, 32, device="cuda")
    good = torch.softmax(torch.randn(4, 3, device="cuda"), 1)
    module(images, good).loss.backward()  # the first step initialises cuDNN and the allocator
    torch.cuda.set_sync_debug_mode("error")
    try:
        module(images, good * 4).loss.backward()  # step 1: unnormalised, queued not read
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(ValueError, match="training step 1: soft targets must be finite, non-negative"):
        for _ in range(50):
            module(images, good).loss.backward()
        module.finite_check.flush()


# --- batches of the wrong shape: what the model expects, and the fix ----------------------------


def test_one_channel_batch_to_a_three_channel_model_names_in_chans(distiller):
    with pytest.raises(
        ValueError, match=r"C = 3.*got 1 channel.*images\.expand\(-1, 3, -1, -1\).*in_chans=1"
    ):
        distiller(torch.zeros(2, 1, 32, 32), torch.tensor([0, 1]))


def test_channels_last_batch_names_the_permute(distiller):
    with pytest.raises(ValueError, match=r"channels last \(N, H, W, C\): pass images\.permute\(0, 3, 1, 2\)"):
        distiller.eval()(torch.zeros(2, 32, 32, 3))


def test_unbatched_image_names_the_batch_axis(distiller):
    with pytest.raises(
        ValueError, match=r"one item of shape \(3, 32, 32\) without a batch axis.*images\[None\]"
    ):
        distiller.eval()(torch.zeros(3, 32, 32))


def test_a_batch_of_another_size_still_runs(distiller):
    """The example's size is no requirement: only what the model fails on is explained."""
    assert distiller.eval()(torch.zeros(2, 3, 48, 40)).logits.shape == (2, 3)


def test_a_batch_of_another_size_for_a_model_of_one_size_names_the_resize_and_img_size():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    distiller = GradualSelfDistiller(model, ["blocks.0"])
    fix = r"got 64x64 images, a size it was not built for: resize them to 32x32.*img_size=64.*image_size=64"
    with pytest.raises(ValueError, match=fix):
        distiller.eval()(torch.zeros(2, 3, 64, 64))
    # Smaller images: resizing only, the fix that also fits a convolutional model too small for them.
    with pytest.raises(ValueError, match=r"got 16x16 images, .*: resize them to 32x32\. The model failed"):
        distiller(torch.zeros(2, 3, 16, 16))


class Grey(torch.nn.Module):
    """A model that repeats a grey channel itself: a one-channel batch is its own business."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.Conv2d(8, 16, 3, 2, 1))
        self.fc = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.body(x.expand(-1, 3, -1, -1)).mean((2, 3)))


def test_a_model_that_takes_other_channels_is_not_second_guessed():
    distiller = GradualSelfDistiller(Grey(), ["body.0"], example_input=torch.zeros(1, 3, 16, 16))
    assert distiller(torch.zeros(2, 1, 16, 16), torch.tensor([0, 1])).logits.shape == (2, 3)


def test_sequence_batches_are_explained_as_sequences():
    model = torch.nn.Sequential(
        torch.nn.Conv1d(2, 8, 3, 2), torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)
    )
    distiller = GradualSelfDistiller(model, ["0"], example_input=torch.zeros(1, 2, 64))
    assert distiller(torch.zeros(2, 2, 96)).logits.shape == (2, 3)
    with pytest.raises(ValueError, match=r"\(N, C, L\) batches with C = 2.*got 3 channels"):
        distiller(torch.zeros(2, 3, 64))
