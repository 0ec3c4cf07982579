"""insert_after: attention after named stages of existing models."""

import pytest
import timm
import torch
import torchvision
from torch import nn

from gradual_sd import ACAM, NormalizedACAM, insert_after


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
        ValueError, match=r"'global_pool' does not output an \(N, C, H, W\) feature map \(got \(1, 512\)\)"
    ):
        insert_after(model, "global_pool", example_input=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="names is empty"):
        insert_after(model, [])
    assert not any(m._forward_hooks for m in model.modules())
