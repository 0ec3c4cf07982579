"""The as-shipped mode and the loader for the authors' checkpoints, against an independent
float64 re-derivation of the authors' network and loss, written here from the description in
the project's method notes (their key layout, ResNet Caffe variant, ACAM, heads, the in-place
sum of the heads, soft cross-entropy without T^2, torch.dist features).

The state_dict is built here in the authors' key layout with random values; the network is a
bottleneck ResNet26 (ResNet50's widths, fewer blocks) at 32 px so that float64 stays fast."""

import re

import pytest
import torch
import torch.nn.functional as F

import examples_path  # noqa: F401
from gsdnet.models import build_gsdnet
from gsdnet.weights import load_reference_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH, BLOCKS, CLASSES, SIZE, BATCH = "resnet26", (2, 2, 2, 2), 7, 32, 4
WIDTHS = (256, 512, 1024, 2048)
T, KL, FEAT = 3.0, 0.3, 0.01


# --- the authors' network, from the description ------------------------------------------------
def authors_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the authors' GSDNet (7 classes) in their key layout, random, float64."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None):
        fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1) if len(shape) > 1 else shape[0]
        return torch.randn(*shape, generator=g, dtype=torch.double) * (scale or fan_in**-0.5)

    sd: dict[str, torch.Tensor] = {}

    def bn(prefix, c):
        sd[f"{prefix}.weight"] = 1 + 0.1 * rand(c, scale=1)
        sd[f"{prefix}.bias"] = 0.1 * rand(c, scale=1)
        sd[f"{prefix}.running_mean"] = 0.1 * rand(c, scale=1)
        sd[f"{prefix}.running_var"] = 1 + 0.1 * torch.rand(c, generator=g, dtype=torch.double)
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(5)

    def linear(prefix, out, inp):
        sd[f"{prefix}.weight"] = rand(out, inp)
        sd[f"{prefix}.bias"] = 0.1 * rand(out, scale=1)

    def gate(prefix, c):
        hidden = c // 16
        for mlp, out in (("mlp", c), ("mean_weight", 1), ("max_weight", 1)):
            linear(f"{prefix}.{mlp}.1", hidden, c)
            linear(f"{prefix}.{mlp}.3", out, hidden)

    sd["conv1.weight"] = rand(64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for stage, (blocks, width) in enumerate(zip(BLOCKS, WIDTHS), start=1):
        planes = width // 4
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            sd[f"{p}.conv1.weight"] = rand(planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            sd[f"{p}.conv2.weight"] = rand(planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            sd[f"{p}.conv3.weight"] = rand(width, planes, 1, 1)
            bn(f"{p}.bn3", width)
            if b == 0:
                sd[f"{p}.downsample.0.weight"] = rand(width, inplanes, 1, 1)
                bn(f"{p}.downsample.1", width)
            inplanes = width
    for j, c in enumerate(WIDTHS[:3], start=1):
        gate(f"cm{j}.0.ChannelGate", c)
        sd[f"cm{j}.1.weight"] = rand(2048, c, 1, 1)
        sd[f"cm{j}.1.bias"] = 0.1 * rand(2048, scale=1)
        bn(f"cm{j}.2", 2048)
        linear(f"fc_{j}", 128, 2048)
        linear(f"fc_{j}_{j}", CLASSES, 2048)
    gate("cm4.0.ChannelGate", 2048)
    linear("fc_4", 128, 2048)
    linear("fc_4_4", CLASSES, 2048)
    return sd


def authors_forward(sd, x):
    """Per-head logits and features (z1..z4, F1..F4) in training mode (batch statistics)."""

    def bn(v, p):
        return F.batch_norm(
            v, sd[f"{p}.running_mean"].clone(), sd[f"{p}.running_var"].clone(),
            sd[f"{p}.weight"], sd[f"{p}.bias"], training=True,
        )  # fmt: skip

    def gate(v, p):
        def mlp(u, q):
            return F.linear(
                F.relu(F.linear(u, sd[f"{q}.1.weight"], sd[f"{q}.1.bias"])),
                sd[f"{q}.3.weight"],
                sd[f"{q}.3.bias"],
            )

        avg, peak = v.mean((2, 3)), v.amax((2, 3))
        attn = mlp(avg, f"{p}.mlp") * mlp(avg, f"{p}.mean_weight") + mlp(peak, f"{p}.mlp") * mlp(
            peak, f"{p}.max_weight"
        )
        return v * torch.sigmoid(attn)[:, :, None, None]

    v = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    v = F.max_pool2d(v, 3, 2, 0, ceil_mode=True)  # the Caffe port's stem pool
    stages = []
    for stage, blocks in enumerate(BLOCKS, start=1):
        for b in range(blocks):
            p, stride = f"layer{stage}.{b}", (2 if stage > 1 and b == 0 else 1)
            out = F.relu(
                bn(F.conv2d(v, sd[f"{p}.conv1.weight"], stride=stride), f"{p}.bn1")
            )  # stride on conv1
            out = F.relu(bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2"))
            out = bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            if b == 0:
                v = bn(F.conv2d(v, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            v = F.relu(out + v)
        stages.append(v)
    logits, features = [], []
    for j, s in enumerate(stages[:3], start=1):
        h = F.conv2d(gate(s, f"cm{j}.0.ChannelGate"), sd[f"cm{j}.1.weight"], sd[f"cm{j}.1.bias"])
        pooled = F.relu(bn(h, f"cm{j}.2")).mean((2, 3))
        logits.append(F.linear(pooled, sd[f"fc_{j}_{j}.weight"], sd[f"fc_{j}_{j}.bias"]))
        features.append(F.linear(pooled, sd[f"fc_{j}.weight"], sd[f"fc_{j}.bias"]))
    pooled = gate(stages[3], "cm4.0.ChannelGate").mean((2, 3))
    logits.append(F.linear(pooled, sd["fc_4_4.weight"], sd["fc_4_4.bias"]))
    features.append(F.linear(pooled, sd["fc_4.weight"], sd["fc_4.bias"]))
    return logits, features


def authors_loss(logits, features, y, shipped: bool):
    """CE on the last head plus, per neighbouring pair, 0.3 * soft CE at T = 3 (no T^2) and
    0.01 * ||F_s - F_t|| over the batch; teachers detached. Shipped: the in-place `+=` makes
    the first student the sum of all four heads."""
    students, student_features = list(logits[:3]), list(features[:3])
    if shipped:
        students[0] = logits[0] + logits[1] + logits[2] + logits[3]
        student_features[0] = features[0] + features[1] + features[2] + features[3]
    loss = F.cross_entropy(logits[3], y)
    for j in range(3):
        teacher = F.softmax(logits[j + 1].detach() / T, dim=1)
        loss = loss + KL * -(teacher * F.log_softmax(students[j] / T, dim=1)).sum(1).mean()
        loss = loss + FEAT * (student_features[j] - features[j + 1].detach()).pow(2).sum().sqrt()
    return loss


# --- where each of the authors' tensors lives in our network (written out independently) ------
def ours_for(key: str, shipped: bool) -> tuple[str, slice | None]:
    """Our state_dict key holding the authors' ``key`` (and the rows it occupies there)."""
    base = "distiller." if shipped else ""
    gate = {
        "mlp.1": ("fc1", None),
        "mlp.3": ("fc2", None),
        "mean_weight.1": ("weight_fc1", 0),
        "max_weight.1": ("weight_fc1", 1),
        "mean_weight.3": ("weight_fc2", 0),
        "max_weight.3": ("weight_fc2", 1),
    }
    m = re.fullmatch(r"cm(\d)\.0\.ChannelGate\.(\w+\.\d)\.(weight|bias)", key)
    if m:
        j, part, kind = int(m[1]), m[2], m[3]
        name, half = gate[part]
        # The last ACAM is appended to layer4, after its blocks.
        where = f"{base}model.layer4.{BLOCKS[3]}" if j == 4 else f"{base}heads.{j - 1}.attn"
        width = WIDTHS[j - 1] // 16 if name == "weight_fc1" else 1
        rows = None if half is None else slice(half * width, (half + 1) * width)
        return f"{where}.{name}.{kind}", rows
    m = re.fullmatch(r"cm(\d)\.([12])\.(.+)", key)
    if m:
        return f"{base}heads.{int(m[1]) - 1}.{'conv' if m[2] == '1' else 'norm'}.{m[3]}", None
    m = re.fullmatch(r"fc_(\d)_\d\.(\w+)", key)
    if m:
        return (f"{base}model.fc.{m[2]}" if m[1] == "4" else f"{base}heads.{int(m[1]) - 1}.fc.{m[2]}"), None
    m = re.fullmatch(r"fc_(\d)\.(\w+)", key)
    if m:
        if m[1] == "4":
            return (f"projection.{m[2]}" if shipped else f"teacher_projection_{m[2]}"), None
        return f"{base}heads.{int(m[1]) - 1}.feature.{m[2]}", None
    return f"{base}model.{key}", None


def build(shipped: bool):
    net, _ = build_gsdnet("gsd-acam", ARCH, CLASSES, img_size=SIZE, caffe_resnet=True, as_shipped=shipped)
    return net.double().train()


def close(a, b, rtol=1e-5, atol=1e-12):
    """Relative to the whole tensor's norm; ``atol`` for gradients that vanish (a conv bias
    before BatchNorm gets only rounding noise, ~1e-19)."""
    return float((a - b).norm()) <= rtol * float(b.norm()) + atol


@pytest.fixture(scope="module")
def reference():
    sd = authors_state_dict()
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.double)
    y = torch.tensor([0, 3, 6, 3])
    return sd, x, y


@pytest.mark.parametrize("shipped", [True, False], ids=["as-shipped", "clean"])
def test_loaded_network_matches_the_float64_rederivation(reference, shipped):
    sd, x, y = reference
    net = build(shipped)
    report = load_reference_state_dict(net, sd)
    leaves = {
        k: v.clone().requires_grad_(v.is_floating_point() and "running" not in k) for k, v in sd.items()
    }
    logits, features = authors_forward(leaves, x)
    expected_loss = authors_loss(logits, features, y, shipped)
    expected_loss.backward()

    out = net(x, y)
    out.loss.backward()
    for j in range(4):
        torch.testing.assert_close(out.head_logits[j], logits[j].detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.head_features[j], features[j].detach(), rtol=1e-10, atol=1e-12)
    # The library's loss computes in float32, so the loss and gradients agree to float32 rounding.
    assert out.loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    params = dict(net.named_parameters())
    checked = set()
    for key, leaf in leaves.items():
        ours, rows = ours_for(key, shipped)
        if ours not in params:
            # Fixed here: the clean mode's last projection (no gradient in their quirk-free
            # network either) and the conv bias before BatchNorm (its gradient vanishes).
            assert leaf.grad is None or leaf.grad.abs().max() < 1e-9, key
            continue
        if leaf.grad is None:
            assert not leaf.requires_grad, key
            continue
        grad = params[ours].grad
        grad = grad if rows is None else grad[rows]
        assert close(grad.reshape(leaf.shape), leaf.grad), key
        checked.add(ours)
    assert checked == set(params)
    if shipped:
        assert params["projection.weight"].grad.abs().max() > 0  # through the authors' sum
        assert report.folded == []
    else:
        assert report.folded == ["cm1.1.bias", "cm2.1.bias", "cm3.1.bias"]


def test_as_shipped_and_clean_losses_differ_as_described(reference):
    sd, x, y = reference
    losses = {}
    for shipped in (True, False):
        net = build(shipped)
        load_reference_state_dict(net, sd)
        losses[shipped] = net(x, y).loss.item()
    assert losses[True] != pytest.approx(losses[False], rel=1e-6)


def test_clean_mode_folds_the_conv_bias_exactly_in_eval(reference):
    sd, x, _ = reference
    nets = {s: build(s) for s in (True, False)}
    for net in nets.values():
        load_reference_state_dict(net, sd)
        net.eval()
    with torch.no_grad():
        shipped, clean = (nets[s](x, run_heads=True).head_logits for s in (True, False))
    for a, b in zip(shipped, clean):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_loader_refuses_missing_unexpected_and_misshapen_keys(reference):
    sd, _, _ = reference
    net = build(True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    broken = dict(sd)
    del broken["cm2.1.bias"]
    broken["fc_5.weight"] = torch.zeros(3)
    broken["fc_1_1.weight"] = torch.zeros(8, 2048, dtype=torch.double)
    with pytest.raises(
        ValueError, match=r"missing 1 \['cm2.1.bias'\]; unexpected 1 \['fc_5.weight'\]; misshapen 1"
    ) as info:
        load_reference_state_dict(net, broken)
    assert "fc_1_1.weight (8, 2048) (expected (7, 2048))" in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # nothing loaded
    with pytest.raises(ValueError, match="gsd-acam"):
        load_reference_state_dict(build_gsdnet("gsd", ARCH, CLASSES, img_size=SIZE).module, sd)


def test_loader_accepts_data_parallel_prefixes_and_the_cli_file(tmp_path, reference):
    sd, x, _ = reference
    path = tmp_path / "RAF_model.pth"
    torch.save({f"module.{k}": v.float() for k, v in sd.items()}, path)
    net, config = build_gsdnet("gsd-acam", ARCH, CLASSES, img_size=SIZE, weights=path)
    assert config["caffe_resnet"] and config["weights"]["kind"] == "authors' checkpoint"
    assert config["weights"]["loaded"] == len(sd) - 3 and len(config["weights"]["sha256"]) == 64
    torch.testing.assert_close(net.model.fc.weight, sd["fc_4_4.weight"].float())
    with pytest.raises(ValueError, match="load it with method 'gsd-acam'"):
        build_gsdnet("baseline", ARCH, CLASSES, img_size=SIZE, weights=path)


def test_as_shipped_heads_and_init():
    torch.manual_seed(0)
    net = build_gsdnet("gsd-acam", ARCH, CLASSES, img_size=SIZE, as_shipped=True).module
    head = net.distiller.heads[0]
    assert head.conv.bias is not None
    std = (2.0 / (1 * 1 * head.conv.out_channels)) ** 0.5
    assert head.conv.weight.std().item() == pytest.approx(std, rel=0.05)
    assert all(m.weight.eq(1).all() for m in net.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # Trainable and under weight decay: the optimiser sees it like every other parameter.
    assert any(p is net.projection.weight for p in net.parameters())
    with pytest.raises(ValueError, match="as_shipped reproduces"):
        build_gsdnet("gsd", ARCH, CLASSES, img_size=SIZE, as_shipped=True)
