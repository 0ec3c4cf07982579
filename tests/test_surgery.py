"""Model surgery: attention after named stages, and in place of squeeze-excite modules."""

import re

import pytest
import timm
import torch
import torchvision
from torch import nn

from gradual_sd import ACAM, NormalizedACAM, insert_after, replace_squeeze_excite
from gradual_sd import squeeze_excite_kinds


def test_appends_to_sequential_stage_and_keeps_weight_names():
    model = timm.create_model("resnet18", num_classes=3)
    before = dict(model.state_dict())
    inserted = insert_after(model, "layer4", example_input=torch.zeros(1, 3, 64, 64))
    assert isinstance(inserted["layer4"], ACAM) and inserted["layer4"].channels == 512
    assert model.layer4[-1] is inserted["layer4"]
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert {k for k in after if k not in before} == {k for k in after if k.startswith("layer4.2.")}
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    assert inserted["layer4"].fc1.weight.grad is not None


def test_output_is_the_attention_of_the_stage_output():
    model = torchvision.models.resnet18(num_classes=3).eval()
    insert_after(model, ["layer3"], attn_layer=NormalizedACAM, example_input=torch.zeros(1, 3, 32, 32))
    attention = model.layer3[-1]
    assert isinstance(attention, NormalizedACAM) and attention.channels == 256
    seen = []
    model.layer4.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        expected = attention(model.layer3[:-1](model.layer2(model.layer1(stem))))
    torch.testing.assert_close(seen[0], expected)


def test_wraps_non_sequential_targets():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    net = Net()
    conv = net.conv
    insert_after(net, "conv", example_input=torch.zeros(1, 3, 8, 8))
    assert isinstance(net.conv, nn.Sequential) and net.conv[0] is conv and isinstance(net.conv[1], ACAM)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(net(x), net.fc(net.conv[1](conv(x)).mean((2, 3))))


def test_errors_name_the_problem():
    model = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(KeyError, match=r"no submodule 'layer9'"):
        insert_after(model, "layer9")
    with pytest.raises(
        ValueError,
        match=r"stage 'global_pool' outputs a tensor of shape \(1, 512\), a pooled \(N, C\) vector",
    ):
        insert_after(model, "global_pool", example_input=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="names is empty"):
        insert_after(model, [])
    assert not any(m._forward_hooks for m in model.modules())


# --- replace_squeeze_excite ---------------------------------------------------------------------

SE_CLASSES = (
    timm.layers.SEModule,
    timm.layers.EffectiveSEModule,
    timm.models._efficientnet_blocks.SqueezeExcite,
    timm.models.hgnet.EseModule,
    timm.models.senet.SEModule,
    torchvision.ops.SqueezeExcitation,
)


def se_shape(se: nn.Module) -> tuple[int, int | None, type]:
    """Channels, hidden width (None without a hidden layer) and gate class, read independently."""
    convs = [m for m in se.modules() if isinstance(m, nn.Conv2d)]
    gate = next(m for m in reversed(list(se.children())) if not isinstance(m, nn.Conv2d | nn.Identity))
    hidden = convs[0].out_channels if len(convs) == 2 else None
    return convs[0].in_channels, hidden, type(gate)


SE_MODELS = {
    "mobilenetv3_small_050": lambda: timm.create_model("mobilenetv3_small_050", num_classes=3),
    "lcnet_050": lambda: timm.create_model("lcnet_050", num_classes=3),
    "regnety_002": lambda: timm.create_model("regnety_002", num_classes=3),
    "ese_vovnet19b_dw": lambda: timm.create_model("ese_vovnet19b_dw", num_classes=3),
    "rexnet_100": lambda: timm.create_model("rexnet_100", num_classes=3),
    "ghostnet_050": lambda: timm.create_model("ghostnet_050", num_classes=3),
    "legacy_seresnet18": lambda: timm.create_model("legacy_seresnet18", num_classes=3),
    "efficientnet_b0": lambda: timm.create_model("efficientnet_b0", num_classes=3),
    "tv_efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=3),
    "tv_mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=3),
    "tv_regnet_y_400mf": lambda: torchvision.models.regnet_y_400mf(num_classes=3),
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(SE_MODELS))
def test_replaces_every_squeeze_excite_and_keeps_the_rest(name):
    torch.manual_seed(0)
    model = SE_MODELS[name]()
    x = torch.randn(2, 3, 64, 64)
    out_shape = model(x).shape
    se_modules = {n: m for n, m in model.named_modules() if isinstance(m, SE_CLASSES)}
    assert se_modules, "the test model has no SE module"
    shapes = {n: se_shape(m) for n, m in se_modules.items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}

    replaced = replace_squeeze_excite(model)

    assert set(replaced) == set(se_modules)
    assert not any(isinstance(m, SE_CLASSES) for m in model.modules())
    assert sum(isinstance(m, ACAM) for m in model.modules()) == len(se_modules)
    for n, attention in replaced.items():
        channels, hidden, gate = shapes[n]
        assert model.get_submodule(n) is attention and isinstance(attention, ACAM)
        assert attention.channels == channels
        assert attention.rd_channels == (hidden if hidden is not None else ACAM(channels).rd_channels)
        assert type(attention.gate) is gate
    inside = tuple(f"{n}." for n in replaced)
    after = model.state_dict()
    kept_before = {k for k in before if not k.startswith(inside)}
    assert kept_before == {k for k in after if not k.startswith(inside)}
    assert all(torch.equal(after[k], before[k]) for k in kept_before)

    out = model(x)
    assert out.shape == out_shape
    out.square().sum().backward()
    for n, attention in replaced.items():
        for pname, param in attention.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), f"{n}.{pname}"


class TinySENet(nn.Module):
    def __init__(self, se: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.se = se
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(self.se(self.conv(x)).mean((2, 3)))


def test_the_attention_takes_the_place_of_the_se():
    net = TinySENet(torchvision.ops.SqueezeExcitation(16, 4, scale_activation=nn.Hardsigmoid)).double()
    attention = replace_squeeze_excite(net)["se"]
    assert net.se is attention
    assert (attention.channels, attention.rd_channels, type(attention.gate)) == (16, 4, nn.Hardsigmoid)
    assert attention.fc1.weight.dtype == torch.float64
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(net(x), net.fc(attention(net.conv(x)).mean((2, 3))))


def test_own_width_and_gate_and_eval_mode():
    net = TinySENet(timm.layers.SEModule(16, rd_channels=2, gate_layer="hard_sigmoid")).eval()
    attention = replace_squeeze_excite(net, NormalizedACAM, keep_width=False, keep_gate=False)["se"]
    assert isinstance(attention, NormalizedACAM) and not attention.training
    assert attention.rd_channels == 8
    logits = torch.linspace(-6, 6, 13)
    torch.testing.assert_close(attention.gate(logits), logits.sigmoid())  # ACAM's own gate


def test_user_kinds_by_class_and_name():
    class MySE(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.reduce, self.expand = nn.Linear(channels, 4), nn.Linear(4, channels)

        def forward(self, x):
            return x * self.expand(self.reduce(x.mean((2, 3)))).sigmoid()[:, :, None, None]

    net = TinySENet(MySE(16))
    with pytest.raises(ValueError, match="TinySENet has no squeeze-excite module"):
        replace_squeeze_excite(net)
    attention = replace_squeeze_excite(net, kinds=[MySE])["se"]
    assert (attention.channels, attention.rd_channels) == (16, 4)
    net.se = torchvision.ops.SqueezeExcitation(16, 4)
    with pytest.raises(ValueError, match="no squeeze-excite module"):
        replace_squeeze_excite(net, kinds="timm.layers.SEModule")
    assert isinstance(replace_squeeze_excite(net, kinds=["torchvision.ops.SqueezeExcitation"])["se"], ACAM)


def test_kinds_accepts_the_names_its_error_lists():
    no_se = nn.Sequential(nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match="no squeeze-excite module") as info:
        replace_squeeze_excite(no_se)
    listed = re.search(r"kinds looked for \((.*?)\)", str(info.value)).group(1).split(", ")
    assert len(listed) == len(squeeze_excite_kinds())
    for name in listed:
        with pytest.raises(ValueError, match=re.escape(f"kinds looked for ({name})")):
            replace_squeeze_excite(no_se, kinds=[name])
    # and the paths where Python says the classes are defined
    net = TinySENet(timm.layers.SEModule(16))
    assert isinstance(replace_squeeze_excite(net, kinds="timm.layers.squeeze_excite.SEModule")["se"], ACAM)


def test_squeeze_excite_errors_name_the_fix():
    model = timm.create_model("cspresnet50", num_classes=3)  # no SE in this family
    with pytest.raises(ValueError, match=r"CspNet has no squeeze-excite.*kinds=.*insert_after") as info:
        replace_squeeze_excite(model)
    assert "timm.models._efficientnet_blocks.SqueezeExcite" in str(info.value)
    net = TinySENet(timm.layers.SEModule(16))
    with pytest.raises(ValueError, match=r"unknown squeeze-excite kind 'SEModule'.*valid: \["):
        replace_squeeze_excite(net, kinds=["SEModule"])
    with pytest.raises(ValueError, match="kinds is empty"):
        replace_squeeze_excite(net, kinds=[])
    with pytest.raises(TypeError, match="kinds must hold nn.Module classes"):
        replace_squeeze_excite(net, kinds=[3])
    with pytest.raises(TypeError, match="pass keep_width=False and keep_gate=False"):
        replace_squeeze_excite(net, lambda channels: nn.Identity())

    def only_narrow(channels, **kwargs):
        if channels > 200:
            raise RuntimeError("too wide")
        return ACAM(channels, **kwargs)

    model = timm.create_model("mobilenetv3_small_050", num_classes=3)
    keys = list(model.state_dict())
    with pytest.raises(RuntimeError, match="too wide"):  # only the last SEs have 288 channels
        replace_squeeze_excite(model, only_narrow)
    assert list(model.state_dict()) == keys  # nothing replaced on error
