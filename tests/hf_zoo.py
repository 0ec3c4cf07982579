"""Tiny configurations of every Hugging Face ``*ForImageClassification`` class, for the zoo tests.

The classes come from ``transformers``' own auto-mapping, so a new architecture shows up as a
missing configuration here (and a failing test) rather than being skipped. Sizes are chosen so
each model builds and runs two steps in well under a second on one CPU thread: widths of 16-64,
one or two blocks per stage, 32-64 px images.
"""

from __future__ import annotations

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

from gradual_sd._probing import main_logits

NUM_LABELS = 5

_VIT = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
)
_SWIN = dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1, 1], num_heads=[1, 2, 4], window_size=4)
_HIERARCHICAL = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])

# model_type -> keyword arguments for its config (``vision_config`` for two-tower models).
TINY_CONFIGS: dict[str, dict] = {
    "beit": dict(_VIT, use_mean_pooling=True),
    "bit": dict(_HIERARCHICAL, embedding_size=8, layer_type="bottleneck", num_groups=2),
    "clip": dict(vision_config=_VIT),
    "convnext": dict(image_size=32, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]),
    "convnextv2": dict(image_size=32, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]),
    "cvt": dict(embed_dim=[16, 24, 32], num_heads=[1, 2, 2], depth=[1, 2, 3]),
    "data2vec-vision": dict(_VIT, use_mean_pooling=True),
    "deit": dict(_VIT),
    "dinat": dict(
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1],
        num_heads=[1, 2, 4],
        kernel_size=3,
        dilations=[[1], [1], [1]],
    ),
    "dinov2": dict(_VIT, mlp_ratio=2),
    "dinov2_with_registers": dict(_VIT, mlp_ratio=2, num_register_tokens=2),
    "donut-swin": dict(_SWIN),
    # efficientformer, nat, van and vit_hybrid: in the mapping of transformers 4.x, deprecated since
    "efficientformer": dict(
        image_size=64,
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 1, 2],
        dim=32,
        key_dim=8,
        num_attention_heads=2,
        resolution=2,
        hidden_size=32,  # the teacher variant's distillation head reads it
    ),
    "efficientnet": dict(
        image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320
    ),  # hidden_dim is the top convolution's width, round_filters(1280) at this width
    "focalnet": dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1, 1], focal_levels=[1, 1, 1]),
    "hgnet_v2": dict(
        stem_channels=[3, 8, 16],
        stage_in_channels=[16, 16, 24, 32],
        stage_mid_channels=[8, 8, 16, 16],
        stage_out_channels=[16, 24, 32, 48],
        stage_num_blocks=[1, 1, 1, 1],
        stage_numb_of_layers=[2, 2, 2, 2],
        hidden_sizes=[16, 24, 32, 48],
        depths=[1, 1, 1, 1],
    ),
    "hiera": dict(
        image_size=[64, 64],
        patch_size=[7, 7],
        patch_stride=[4, 4],
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        masked_unit_size=[8, 8],
        query_stride=[2, 2],
    ),
    "ijepa": dict(_VIT),
    "imagegpt": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64),
    "levit": dict(
        image_size=128,
        patch_size=16,
        hidden_sizes=[24, 32, 48],
        num_attention_heads=[1, 2, 2],
        depths=[1, 1, 1],
        key_dim=[8, 8, 8],
        drop_path_rate=0,
        mlp_ratio=[2, 2, 2],
        attention_ratio=[2, 2, 2],
    ),
    "metaclip_2": dict(vision_config=_VIT),
    "mobilenet_v1": dict(image_size=32, depth_multiplier=0.25),
    "mobilenet_v2": dict(image_size=32, depth_multiplier=0.25),
    "mobilevit": dict(
        image_size=64,
        hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32],
        num_attention_heads=2,
    ),
    "mobilevitv2": dict(image_size=64, width_multiplier=0.25),
    "nat": dict(patch_size=4, embed_dim=16, depths=[1, 1, 1], num_heads=[1, 2, 4], kernel_size=3),
    "perceiver": dict(
        num_latents=16,
        d_latents=32,
        d_model=64,
        num_blocks=1,
        num_self_attends_per_block=4,
        num_self_attention_heads=2,
        num_cross_attention_heads=1,
        qk_channels=32,
        v_channels=32,
        image_size=32,
    ),
    "poolformer": dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]),
    "pp_lcnet": dict(scale=0.25),
    "pvt": dict(
        image_size=64, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2]
    ),
    "pvt_v2": dict(
        image_size=64, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2]
    ),
    "regnet": dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], groups_width=8),
    "resnet": dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]),
    "segformer": dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2]),
    # Its defaults build a Gemma 3 language model (262k-token vocabulary, 26 layers): 14 GB
    # of RAM in the test. The special tokens' ids must fit the tiny vocabulary, and the 4x4
    # patches pool to mm_tokens_per_image = 2x2 image tokens.
    "shieldgemma2": dict(
        vision_config=_VIT,
        text_config=dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        ),
        mm_tokens_per_image=4,
        boi_token_index=60,
        eoi_token_index=61,
        image_token_index=62,
        yes_token_index=10,
        no_token_index=11,
    ),
    "siglip": dict(vision_config=_VIT),
    "siglip2": dict(vision_config=dict(_VIT, num_patches=16)),
    "swiftformer": dict(image_size=32, depths=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32]),
    "swin": dict(_SWIN),
    "swinv2": dict(_SWIN),
    "textnet": dict(image_size=[32, 32], stem_out_channels=8, hidden_sizes=[8, 8, 16, 24, 32]),
    "timm_wrapper": dict(architecture="resnet18"),
    "van": dict(image_size=32, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]),
    "vit": dict(_VIT),
    "vit_hybrid": dict(
        _VIT,
        patch_size=1,
        backbone_config=dict(
            embedding_size=8,
            hidden_sizes=[8, 16, 24],
            depths=[1, 1, 1],
            layer_type="bottleneck",
            num_groups=2,
            out_features=["stage3"],
        ),
        backbone_featmap_shape=[1, 24, 2, 2],
    ),
    "vit_msn": dict(_VIT),
}


def image_classifiers() -> list[tuple[str, str]]:
    """``(model_type, class name)`` for every image-classification class in the auto-mapping."""
    pairs = []
    for model_type, names in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.items():
        for name in (names,) if isinstance(names, str) else names:
            pairs.append((model_type, name))
    return sorted(pairs)


def build(model_type: str, class_name: str) -> torch.nn.Module:
    """A randomly initialised tiny ``class_name`` with ``NUM_LABELS`` labels, in train mode."""
    kwargs = dict(TINY_CONFIGS[model_type])
    vision = kwargs.pop("vision_config", None)
    backbone = kwargs.pop("backbone_config", None)
    if backbone is not None:  # ViT hybrid: a BiT backbone's config
        kwargs["backbone_config"] = transformers.BitConfig(**backbone)
    config = transformers.AutoConfig.for_model(model_type, num_labels=NUM_LABELS, **kwargs)
    if vision is not None:
        for key, value in vision.items():
            setattr(config.vision_config, key, value)
    torch.manual_seed(0)
    return getattr(transformers, class_name)(config).train()


def assert_reloaded_equal(saved: torch.nn.Module, reloaded: torch.nn.Module, images: torch.Tensor) -> None:
    """A ``save_pretrained``/``from_pretrained`` round trip: every tensor of the state dict bit
    for bit, and the logits within float32 kernel rounding. Loaded from safetensors, the weights
    sit at addresses not aligned to 64 bytes, and the CPU's kernels may then sum in another order
    (a trained tiny MobileNetV2: 4e-5 on logits of 7; with the parameters cloned, 0)."""
    saved_state, loaded = saved.state_dict(), reloaded.state_dict()
    assert saved_state.keys() == loaded.keys()
    for name, tensor in saved_state.items():
        assert torch.equal(loaded[name], tensor), name
    with torch.no_grad():
        expected, got = main_logits(saved(images)), main_logits(reloaded(images))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
