"""Staged backbones: stage composition, freezing semantics and initializations."""

import pickle
import sys

import pytest
import torch
from helpers import REPO
from torch import nn

from tlselect.training import models
from tlselect.training.models import InitError, StagedNet


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_stages_compose_to_the_full_network(images):
    model = StagedNet("resnet18", 5).eval()
    with torch.no_grad():
        full = model(images)
        for cut in range(1, len(model.stage_names) + 1):
            assert torch.allclose(model(model(images, stop=cut), start=cut), full, atol=1e-5)
        x = model.preprocess(images)
        reference = model.net(x)  # torchvision's own forward
    assert full.shape == (4, 5)
    assert torch.allclose(full, reference, atol=1e-5)


def test_resolution_upsamples_input(images):
    model = StagedNet("resnet18", 3, resolution=64)
    assert model.preprocess(images).shape[-2:] == (64, 64)


@pytest.mark.parametrize(
    "freeze, frozen_stages",
    [("none", []), ("layer1", ["stem", "layer1"]), ("layer4", ["stem", "layer1", "layer2", "layer3", "layer4"])],
)
def test_freezing_stops_gradients_and_batchnorm_updates(freeze, frozen_stages):
    model = StagedNet("resnet18", 3)
    model.freeze_through(freeze)
    model.train()
    for stage, paths in model.spec.stages:
        for path in paths:
            module = model.net.get_submodule(path)
            grads = {p.requires_grad for p in module.parameters()}
            bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
            if stage in frozen_stages:
                assert grads <= {False} and all(not bn.training for bn in bns), stage
            else:
                assert grads <= {True} and all(bn.training for bn in bns), stage
    assert all(p.requires_grad for p in model.net.fc.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (trainable == sum(p.numel() for p in model.parameters())) == (freeze == "none")


def test_frozen_prefix_is_a_pure_function_in_train_mode(images):
    model = StagedNet("resnet18", 3)
    model.freeze_through("layer3")
    model.train()
    stop = model.frozen_stop()
    bn = model.net.layer3[0].bn1
    before = bn.running_mean.clone()
    with torch.no_grad():
        a, b = model(images, stop=stop), model(images[:2], stop=stop)
    assert torch.allclose(a[:2], b, atol=1e-5)
    assert torch.equal(bn.running_mean, before)


def test_unknown_freeze_point_is_named():
    with pytest.raises(ValueError, match="no stage 'layer9'"):
        StagedNet("resnet18", 3).freeze_through("layer9")


def _torchvision_state(num_classes=1000):
    torch.manual_seed(123)
    import torchvision

    return torchvision.models.resnet18(num_classes=num_classes).state_dict()


def test_imagenet_init_loads_through_the_weights_api(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = models.imagenet_weights_path("resnet18")
    assert str(path).startswith(str(tmp_path / "torch"))
    assert path.name == models.imagenet_weights("resnet18").url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True)
    state = _torchvision_state()
    torch.save(state, path)
    model = StagedNet("resnet18", 10)
    note = models.initialize(model, "imagenet")
    assert torch.equal(model.net.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    assert model.net.fc.out_features == 10
    assert note["classifier_replaced"] and "fc.weight" in note["skipped_keys"]


def test_imagenet_init_offline_names_the_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(InitError, match="place that file at .*source"):
        models.initialize(StagedNet("resnet18", 10), "imagenet")


def test_path_and_source_inits_accept_plain_and_checkpoint_files(tmp_path):
    state = _torchvision_state(num_classes=7)
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"model": state, "run_id": "x"}, tmp_path / "checkpoint.pt")
    for init, extra in ((str(tmp_path / "plain.pt"), None), ("source", str(tmp_path / "checkpoint.pt"))):
        model = StagedNet("resnet18", 3)
        models.initialize(model, init, extra)
        assert torch.equal(model.net.conv1.weight, state["conv1.weight"])
        assert model.net.fc.out_features == 3


def test_wrong_shapes_and_missing_layers_are_named(tmp_path):
    state = _torchvision_state()
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    del state["layer4.1.bn2.running_var"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(
        InitError, match=r"missing layers: layer4.1.bn2.running_var.*wrong shapes: layer1.0.conv1.weight"
    ):
        models.initialize(StagedNet("resnet18", 3), str(tmp_path / "bad.pt"))


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload()}, f, protocol=2)
    with pytest.raises(InitError, match="refusing to load"):
        models.initialize(StagedNet("resnet18", 3), str(path))
    assert "pickled code ran" not in capsys.readouterr().out


def test_other_backbones_are_table_entries(images):
    model = StagedNet("mobilenet_v3_small", 4).eval()
    with torch.no_grad():
        full = model(images)
        cut = model.stage_index("block2") + 1
        assert torch.allclose(model(model(images, stop=cut), start=cut), full, atol=1e-5)


def test_the_weights_step_writes_the_file_jobs_read_and_offline_names_it(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import prepare_data

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    dest = tmp_path / "resources/weights/resnet18-imagenet.pth"

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    assert prepare_data.main(["weights", "--backbone", "resnet18", "--out", str(dest)]) == 2
    error = capsys.readouterr().err
    assert str(dest) in error and str(models.imagenet_weights_path("resnet18")) in error and not dest.exists()

    cached = models.imagenet_weights_path("resnet18")  # a user placed torchvision's file in its cache
    torch.save(_torchvision_state(), cached)
    assert prepare_data.main(["weights", "--backbone", "resnet18", "--out", str(dest)]) == 0
    model = StagedNet("resnet18", 10)
    assert models.initialize(model, "imagenet", str(dest))["source"] == "imagenet"
    assert torch.equal(model.net.layer1[0].conv1.weight, _torchvision_state()["layer1.0.conv1.weight"])
