"""Hugging Face vision models with the distiller's defaults, one per kind of structure; the
whole auto-mapping runs in test_hf_zoo.py (slow). CI installs the ``hf`` extra."""

import pytest
import torch
from torch import nn

from gradual_sd import GradualSelfDistiller, insert_after
from gradual_sd._stages import default_example_input

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")

from hf_zoo import TINY_CONFIGS, build  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(config_class, model_class, **kwargs):
    torch.manual_seed(0)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(num_labels=5, **kwargs))


def vit(**kwargs):
    return tiny(
        "ViTConfig",
        "ViTForImageClassification",
        **dict(
            image_size=48,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=12,
            num_attention_heads=2,
            intermediate_size=64,
            num_channels=1,
        )
        | kwargs,
    )


def layers(model, kind):
    """Names of the modules of class ``kind`` (module paths differ across transformers versions)."""
    return [name for name, module in model.named_modules() if type(module).__name__ == kind]


def train_step(distiller, example):
    images = torch.randn(2, *example.shape[1:])
    out = distiller.train()(images, torch.tensor([0, 4]))
    out.loss.backward()
    assert all(p.grad is not None for p in distiller.heads.parameters())
    distiller.eval()
    with torch.no_grad():
        assert torch.equal(distiller(images).logits, distiller.model(images).logits)


def test_vit_reads_its_config_and_gets_three_evenly_spaced_blocks():
    model = vit()
    example = default_example_input(model)
    assert example.shape == (1, 1, 48, 48)  # config.image_size and config.num_channels
    distiller = GradualSelfDistiller(model)
    blocks = layers(model, "ViTLayer")
    assert distiller.stage_names == (blocks[2], blocks[5], blocks[8])  # after 3, 6, 9 of 12 blocks
    assert distiller.num_prefix_tokens == (1, 1, 1)  # the class token, counted from the patch grid
    assert distiller.classifier_name == "classifier"
    train_step(distiller, example)


def test_a_model_of_one_size_is_probed_three_times():
    """At the example, at twice its size with one more image (the ViT refuses it), and at its
    size with one more image; never a run the construction already made."""
    model = vit()
    runs = []
    handle = model.register_forward_pre_hook(lambda m, args: runs.append(tuple(args[0].shape)))
    GradualSelfDistiller(model).remove()
    handle.remove()
    assert runs == [(1, 1, 48, 48), (2, 1, 96, 96), (2, 1, 48, 48)]


def test_resnet_stage_zero_is_its_first_stage_not_the_stem():
    model = tiny(
        "ResNetConfig",
        "ResNetForImageClassification",
        embedding_size=8,
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 1, 1],
    )
    distiller = GradualSelfDistiller(model, example_input=torch.zeros(1, 3, 64, 64))
    assert distiller.stage_names == tuple(layers(model, "ResNetStage")[:3])
    assert [s.reduction for s in distiller.stages] == [4, 8, 16]


def test_swin_heads_go_on_blocks_not_windows_or_branches():
    model = tiny(
        "SwinConfig",
        "SwinForImageClassification",
        image_size=128,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 2, 2, 4],
        window_size=4,
    )
    distiller = GradualSelfDistiller(model)
    assert distiller.stage_names == tuple(layers(model, "SwinLayer")[:3])  # one block per stage
    assert distiller.layouts == ("NLC",) * 3 and [s.channels for s in distiller.stages] == [16, 32, 64]
    train_step(distiller, default_example_input(model))
    with pytest.raises(TypeError, match="model.module"):
        GradualSelfDistiller(nn.DataParallel(distiller.export()))


def test_mobilevit_batch_folded_patches_are_not_tapped():
    """MobileViT folds 2x2 patches into the batch axis: (N*4, P, C) is no stage (the issue's
    raw error when training)."""
    model = tiny(
        "MobileViTConfig",
        "MobileViTForImageClassification",
        image_size=64,
        hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32],
        num_attention_heads=2,
    )
    distiller = GradualSelfDistiller(model)
    assert all(s.layout == "NCHW" for s in distiller.stages)
    train_step(distiller, default_example_input(model))


def test_deit_with_teacher_averages_two_heads_and_taps_either():
    model = tiny("DeiTConfig", "DeiTForImageClassificationWithTeacher", **TINY_CONFIGS["deit"])
    distiller = GradualSelfDistiller(model)
    assert distiller.classifier_name in ("cls_classifier", "distillation_classifier")
    assert distiller.num_prefix_tokens == (2, 2, 2)  # class and distillation tokens
    train_step(distiller, default_example_input(model))


def test_insert_after_a_token_stage_says_why_not():
    with pytest.raises(ValueError, match="token sequences"):
        model = vit(num_hidden_layers=2)
        insert_after(model, layers(model, "ViTLayer")[0])


def test_imagegpt_takes_token_ids_from_its_config():
    """ImageGPT reads an image as ids of colour clusters: the example is one sequence of
    ``n_positions`` ids, its blocks are (N, L, C) stages, and images are refused by name."""
    model = tiny(
        "ImageGPTConfig", "ImageGPTForImageClassification", n_embd=32, n_layer=8, n_head=2, n_positions=64
    )
    example = default_example_input(model)
    assert example.shape == (1, 64) and example.dtype == torch.long
    distiller = GradualSelfDistiller(model)
    blocks = layers(model, "ImageGPTBlock")
    assert distiller.stage_names == (blocks[1], blocks[3], blocks[5])  # after 2, 4, 6 of 8 blocks
    assert [s.layout for s in distiller.stages] == ["NLC"] * 3
    assert distiller.num_prefix_tokens == (0, 0, 0)
    ids = torch.randint(0, 16, (2, 64))
    out = distiller.train()(ids, torch.tensor([0, 4]))
    out.loss.backward()
    assert all(p.grad is not None for p in distiller.heads.parameters())
    distiller.eval()
    with torch.no_grad():
        assert torch.equal(distiller(ids).logits, model(ids).logits)
    with pytest.raises(TypeError, match=r"\(N, L\) integer token ids.*ImageGPTImageProcessor"):
        distiller(torch.randn(2, 3, 8, 8))


def test_an_image_example_for_a_token_model_is_refused_with_the_fix():
    model = tiny(
        "ImageGPTConfig", "ImageGPTForImageClassification", n_embd=32, n_layer=2, n_head=2, n_positions=64
    )
    with pytest.raises(ValueError, match=r"takes input_ids.*\(N, L\) integer batch"):
        GradualSelfDistiller(model, example_input=torch.zeros(1, 3, 8, 8))


def test_images_of_another_size_name_image_size_as_grey_images_name_num_channels():
    distiller = GradualSelfDistiller(vit(num_channels=3)).eval()
    with pytest.raises(ValueError, match=r"got 1 channel.*num_channels="):
        distiller(torch.zeros(2, 1, 48, 48))
    with pytest.raises(ValueError, match=r"got 96x96 images.*resize them to 48x48.*image_size=96"):
        distiller(torch.zeros(2, 3, 96, 96))


def test_token_ids_are_an_example_only_for_a_model_that_takes_them():
    with pytest.raises(ValueError, match=r"example_input must be .*got \(1, 48\)"):
        GradualSelfDistiller(vit(), example_input=torch.zeros(1, 48, dtype=torch.long))


def test_a_stage_of_one_position_at_the_only_size_levit_takes_is_the_users_to_name():
    """LeViT built for 64 px fails at a larger size, and its second stage has one token at 64 px:
    the refusal names the size and stage_layout, and the stage named with its layout trains."""
    model = tiny("LevitConfig", "LevitForImageClassification", **TINY_CONFIGS["levit"] | {"image_size": 64})
    stage = "levit.encoder.stages.1"
    with pytest.raises(ValueError, match=r"\(1, 1, 48\): one position at 64x64, the only input size"):
        GradualSelfDistiller(model, [stage])
    distiller = GradualSelfDistiller(model, [stage], stage_layout="NLC")
    assert distiller.stages[0].shape == (1, 1, 48)
    train_step(distiller, default_example_input(model))


def test_levit_heads_skip_the_convolutional_stem():
    """LeViT's patch embedding is four strided convolutions that end in tokens at reduction 16:
    its convolutions are steps of the embedding, not stages (one head per later resolution)."""
    model = build("levit", "LevitForImageClassification")  # the zoo's tiny LeViT, 128 px
    distiller = GradualSelfDistiller(model)
    assert not [name for name in distiller.stage_names if "patch_embeddings" in name], distiller.stage_names
    assert [s.reduction for s in distiller.stages] == [16.0, 32.0]
    train_step(distiller, default_example_input(model))
