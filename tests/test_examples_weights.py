"""Initial weights: the resnet50_ft pickle format (built here from a small bottleneck ResNet),
the Caffe-port patch, ordinary checkpoints, and failing loudly on a key mismatch."""

import hashlib
import pickle

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import examples_path  # noqa: F401
from gsdnet.models import build_gsdnet
from gsdnet.weights import load_weights, patch_caffe_resnet, read_state_dict

ARCH = "resnet26"  # bottleneck blocks like resnet50, fewer of them

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def caffe_source():
    """A Caffe-layout bottleneck ResNet with random weights and BN statistics, 20 classes."""
    torch.manual_seed(0)
    model = patch_caffe_resnet(timm.create_model(ARCH, num_classes=20)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    return model


def write_pickle(model, path, prefix=""):
    """The resnet50_ft format: {torchvision name: numpy array}, protocol 2, no BN counters."""
    arrays = {prefix + k: v.numpy() for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    with open(path, "wb") as f:
        pickle.dump(arrays, f, protocol=2)


def test_patch_moves_stride_and_uses_ceil_mode_pool():
    model = patch_caffe_resnet(timm.create_model(ARCH, num_classes=5)).eval()
    assert model.maxpool.ceil_mode and model.maxpool.padding == 0
    assert model.layer1[0].conv1.stride == (1, 1)
    for stage in (model.layer2, model.layer3, model.layer4):
        assert stage[0].conv1.stride == (2, 2) and stage[0].conv2.stride == (1, 1)
        assert all(block.conv1.stride == (1, 1) for block in stage[1:])
    # 33 px: stem conv -> 17; ceil-mode pool without padding -> 8 (timm's padded pool gives 9).
    features = model.forward_intermediates(torch.zeros(1, 3, 33, 33), intermediates_only=True)
    assert features[1].shape[-1] == 8
    with pytest.raises(ValueError, match="not a ResNet"):
        patch_caffe_resnet(timm.create_model("test_vit", num_classes=5))


def test_pickle_loads_into_patched_model_and_reproduces_features(tmp_path, caffe_source):
    path = tmp_path / "resnet_ft_weight.pkl"
    write_pickle(caffe_source, path)
    built = build_gsdnet("baseline", ARCH, num_classes=7, weights=path, img_size=64)
    model = built.module.model.eval()
    assert built.config["caffe_resnet"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), caffe_source.forward_features(x))
    # The trap the patch avoids: the same weights in an unpatched network compute something else.
    plain = build_gsdnet(
        "baseline", ARCH, num_classes=7, weights=path, caffe_resnet=False, img_size=64
    ).module.model.eval()
    with torch.no_grad():
        assert not torch.allclose(plain.forward_features(x), caffe_source.forward_features(x))


def test_load_report_names_classifier_and_counters(tmp_path, caffe_source, caplog):
    path = tmp_path / "resnet_ft_weight.pkl"
    write_pickle(caffe_source, path)
    model = patch_caffe_resnet(timm.create_model(ARCH, num_classes=7))
    report = load_weights(model, read_state_dict(path))
    own = model.state_dict()
    assert report.mismatched == ["fc.bias", "fc.weight"]  # 20 classes in the file, 7 here
    assert report.missing == sorted(k for k in own if "num_batches_tracked" in k)
    assert report.unexpected == []
    assert len(report.loaded) == len(own) - len(report.missing) - 2
    assert "loaded" in report.summary()


def test_gsd_acam_keeps_loaded_backbone_keys(tmp_path, caffe_source):
    path = tmp_path / "resnet_ft_weight.pkl"
    write_pickle(caffe_source, path)
    distiller, config = build_gsdnet("gsd-acam", ARCH, num_classes=7, weights=path, img_size=64)
    model = distiller.model
    torch.testing.assert_close(model.layer4[1].conv3.weight, caffe_source.layer4[1].conv3.weight)
    assert type(model.layer4[-1]).__name__ == "ACAM"
    assert list(distiller.stage_names) == ["layer1", "layer2", "layer3"]


def test_prefix_mismatch_fails_loudly(tmp_path, caffe_source):
    path = tmp_path / "wrapped.pkl"
    write_pickle(caffe_source, path, prefix="backbone.")
    with pytest.raises(ValueError, match=r"matched only 0 of"):
        build_gsdnet("baseline", ARCH, num_classes=7, weights=path, img_size=64)


def test_pth_and_safetensors_checkpoints(tmp_path, caffe_source):
    state = {k: v.clone() for k, v in caffe_source.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        assert set(read_state_dict(tmp_path / name)) == set(state)
        model = build_gsdnet(
            "baseline", ARCH, num_classes=20, weights=tmp_path / name, caffe_resnet=True, img_size=64
        ).module.model
        torch.testing.assert_close(model.state_dict()["fc.weight"], state["fc.weight"])


class RunsCode:
    """A pickle payload that would create ``path`` when unpickled by a plain ``pickle.load``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def test_pickle_that_would_run_code_is_refused(tmp_path, caffe_source):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "vgg_msceleb_resnet50_ft_weight.pkl"
    arrays = {k: v.numpy() for k, v in caffe_source.state_dict().items() if "num_batches" not in k}
    arrays["conv1.weight"] = RunsCode(marker)
    with open(path, "wb") as f:
        pickle.dump(arrays, f, protocol=2)
    with open(path, "rb") as f:  # the payload is live: a plain pickle.load runs it
        pickle.load(f, encoding="latin1")
    assert marker.exists()
    marker.unlink()
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load __builtin__\.exec"):
        build_gsdnet("baseline", ARCH, num_classes=7, weights=path, img_size=64)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_safe_unpickler_reads_arrays_of_every_protocol(tmp_path, protocol):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], dtype=np.int64)}
    path = tmp_path / "w.pkl"
    with open(path, "wb") as f:
        pickle.dump(arrays, f, protocol=protocol)
    state = read_state_dict(path)
    assert state.keys() == arrays.keys()
    for key, value in arrays.items():
        assert np.array_equal(state[key].numpy(), value)


def test_every_load_reports_counts_and_sha256(tmp_path, caffe_source):
    path = tmp_path / "resnet_ft_weight.pkl"
    write_pickle(caffe_source, path)
    config = build_gsdnet("baseline", ARCH, num_classes=7, weights=path, img_size=64).config
    record = config["weights"]
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (record["mismatched"], record["unexpected"], record["kind"]) == (2, 0, "backbone")
    assert (
        record["loaded"]
        == len(caffe_source.state_dict()) - sum("num_batches" in k for k in caffe_source.state_dict()) - 2
    )
