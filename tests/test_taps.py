"""The hooks every stage tap goes through: watching, replacing, elements of tuple outputs, and
leaving no hook behind."""

import pytest
import torch
from torch import nn

from gradual_sd._taps import Hooks, StageTaps, tapped_by


class PairStage(nn.Module):
    """Returns ``(features, extra)``, as PiT's and MViTv2's stages do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x), x.mean()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage = PairStage()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        features, extra = self.stage(x)
        return self.fc(features.mean((2, 3))) + extra


def inputs():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_a_hook_can_replace_one_element_of_a_stage_output():
    torch.manual_seed(0)
    model, x = Net().double(), inputs()
    features, extra = model.stage(x)
    expected = model.fc((2 * features).mean((2, 3))) + extra  # the extra element left as it was
    seen = []
    with Hooks(model) as hooks:
        hooks.on_output("stage", lambda name, value: seen.append(name) or 2 * value, element=0)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert seen == ["stage"]
    assert not torch.equal(model(x), expected)  # removed on leaving the block


def test_a_hook_that_returns_none_only_watches():
    torch.manual_seed(0)
    model, x = Net().double(), inputs()
    expected = model(x)
    inputs_seen = []
    with Hooks(model) as hooks:
        hooks.on_output("stage.conv", lambda name, value: None)
        hooks.on_input("fc", lambda name, value: inputs_seen.append(value.shape))
        assert torch.equal(model(x), expected)
    assert inputs_seen == [(2, 4)]


def test_hooks_are_found_and_all_removed():
    model = Net()
    hooks = Hooks(model)
    hooks.on_output("stage", lambda name, value: None)
    hooks.on_input("fc", lambda name, value: None)
    assert tapped_by(model) == ["stage", "fc"] and hooks.active
    hooks.remove()
    assert tapped_by(model) == [] and not hooks.active


def test_an_unknown_name_leaves_no_hook_behind():
    model = Net()
    hooks = Hooks(model)
    hooks.on_output("stage", lambda name, value: None)
    with pytest.raises(KeyError, match="no submodule 'stag'; close matches"):
        hooks.on_output("stag", lambda name, value: None)
    assert tapped_by(model) == []


class Stage:
    def __init__(self, name, element=None):
        self.name, self.element = name, element


def test_stage_taps_capture_only_between_start_and_stop():
    model, x = Net(), inputs().float()
    taps = StageTaps(model, [Stage("stage", 0)], input_names=["fc"])
    model(x)  # nothing is recording
    captured = taps.start(str(x.device))
    model(x)
    taps.stop(str(x.device))
    assert captured["stage"].shape == (2, 4, 8, 8) and captured["fc"].shape == (2, 4)
    assert taps._store == {}
    taps.remove()
    assert tapped_by(model) == [] and not taps.active
