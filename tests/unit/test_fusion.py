"""Fused runs and run groups: the fused network is its members' computation; a group's runs, fused
or one after another, give what each run gives alone; killed groups resume; a diverging run does not
stop the others."""

import copy
import dataclasses

import pytest
import torch
from helpers import quiet, small_tensors, without_timings

from tlselect.core.registry import read_record, validate_record, write_record
from tlselect.training.fusion import FusedStagedNet, FusionError
from tlselect.training.groups import train_group
from tlselect.training.models import StagedNet
from tlselect.training.options import TrainConfig
from tlselect.training.trainer import train

BACKBONES = ("resnet18", "mobilenet_v3_small")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def members(backbone: str, seeds=(0, 1, 2), dtype=torch.float32, freeze: str = "none") -> list[StagedNet]:
    nets = []
    for seed in seeds:
        torch.manual_seed(seed)
        net = StagedNet(backbone, 3).to(dtype)
        net.freeze_through(freeze)
        nets.append(net)
    return nets


@pytest.mark.parametrize("backbone", BACKBONES)
def test_fused_training_is_each_runs_own_in_float64(backbone):
    """Three runs (own inits, batches, learning rates, momenta, weight decays, dropout masks) trained
    fused for two SGD steps equal the same runs trained alone, to float64 rounding."""
    fused_nets = members(backbone, dtype=torch.float64)
    alone = copy.deepcopy(fused_nets)
    settings = [(0.1, 0.9, 5e-4), (0.02, 0.5, 0.0), (0.3, 0.0, 1e-2)]  # learning rate, momentum, weight decay
    optimizers = [
        [torch.optim.SGD(net.parameters(), lr=lr, momentum=m, weight_decay=wd)
         for net, (lr, m, wd) in zip(nets, settings, strict=True)]
        for nets in (fused_nets, alone)
    ]  # fmt: skip
    rngs = [torch.Generator().manual_seed(100 + b) for b in range(3)]
    fused = FusedStagedNet(fused_nets, rngs)
    data = torch.Generator().manual_seed(0)
    for _ in range(2):
        xs = [torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=data) for _ in range(3)]
        ys = [torch.randint(0, 3, (4,), generator=data) for _ in range(3)]
        dropout_states = [rng.get_state() for rng in rngs]  # what each run's dropout draws from
        fused.train()
        logits = fused.split(fused(torch.cat(xs, 1)))
        losses = [torch.nn.functional.cross_entropy(logits[:, b], ys[b]) for b in range(3)]
        sum(losses).backward()
        for optimizer in optimizers[0]:
            optimizer.step()
            optimizer.zero_grad()
        for b, net in enumerate(alone):
            net.train()
            torch.set_rng_state(dropout_states[b])  # alone, a run's dropout draws from the global generator
            loss = torch.nn.functional.cross_entropy(net(xs[b]), ys[b])
            assert loss.item() == pytest.approx(losses[b].item(), rel=1e-12)
            loss.backward()
            optimizers[1][b].step()
            optimizers[1][b].zero_grad()
    for net, reference in zip(fused_nets, alone, strict=True):
        for (name, value), expected in zip(net.state_dict().items(), reference.state_dict().values(), strict=True):
            assert torch.allclose(value, expected, rtol=1e-10, atol=1e-12), name


def test_fused_network_keeps_each_runs_tensors_and_frozen_prefix():
    """The fused network holds no tensors: each run's state dict is its own network's, loadable by an
    ordinary one that then computes what the fused network computed for it (frozen prefix in eval mode)."""
    nets = members("resnet18", seeds=(0, 1), freeze="layer2")
    fused = FusedStagedNet(nets).train()
    assert not list(fused.parameters()) and not fused.state_dict()
    assert all(not m.training for m in fused._stage_modules[fused.frozen_stop() - 1])
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    before = [copy.deepcopy(net.net.state_dict()) for net in nets]
    with torch.no_grad():
        logits = fused.split(fused(torch.cat([images, images.flip(0)], 1)))
    for b, net in enumerate(nets):
        fresh = StagedNet("resnet18", 3)
        fresh.net.load_state_dict(before[b])
        fresh.freeze_through("layer2")
        fresh.train()
        with torch.no_grad():
            alone = fresh(images if b == 0 else images.flip(0))
        assert torch.allclose(logits[:, b], alone, atol=1e-5)
        assert torch.allclose(fresh.net.layer3[0].bn1.running_mean, net.net.layer3[0].bn1.running_mean, atol=1e-6)
        assert fresh.net.state_dict().keys() == net.net.state_dict().keys()
    assert not torch.equal(nets[0].net.layer3[0].bn1.running_mean, nets[1].net.layer3[0].bn1.running_mean)
    assert torch.equal(nets[0].net.bn1.running_mean, torch.zeros(64))  # frozen: its statistics stay


def test_networks_of_other_shapes_do_not_fuse():
    with pytest.raises(FusionError, match="differ in backbone"):
        FusedStagedNet([StagedNet("resnet18", 3), StagedNet("mobilenet_v3_small", 3)])
    with pytest.raises(FusionError, match="differ in out_features"):
        FusedStagedNet([StagedNet("resnet18", 3), StagedNet("resnet18", 4)])
    unusual = StagedNet("resnet18", 3)
    unusual.net.layer1[0].relu = torch.nn.PReLU()
    with pytest.raises(FusionError, match="cannot fuse PReLU"):
        FusedStagedNet([unusual, copy.deepcopy(unusual)])


# ---------------------------------------------------------------------------------------------
# Run groups through the trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_tensors(tmp_path_factory.mktemp("group") / "data", sizes=(("train", 16), ("val", 8), ("test", 8)))


def run_config(data, folder, name, **settings) -> TrainConfig:
    base = dict(data=str(data), out=str(folder / f"{name}.pt"), record=str(folder / f"{name}.json"), run_id=name,
                epochs=2, batch_size=8, lr=0.05, precision="float32", channels_last=False, device="cpu", seed=7,
                threads=1, eval_batch_size=8)  # fmt: skip
    return TrainConfig(**(base | settings))


def group(data, folder, backbone, weights) -> list[TrainConfig]:
    """Two fusible runs (other init, learning rate, momentum, weight decay, label smoothing, seed) and
    one of a shape of its own (another batch size)."""
    return [
        run_config(data, folder, "a", backbone=backbone),
        run_config(
            data,
            folder,
            "b",
            backbone=backbone,
            init=str(weights),
            lr=0.02,
            momentum=0.5,
            weight_decay=1e-3,
            label_smoothing=0.1,
            seed=3,
        ),  # fmt: skip
        run_config(data, folder, "c", backbone=backbone, batch_size=16, optimizer="adamw", lr=1e-3),
    ]


def separately(configs) -> list[dict]:
    """Each run as its own job runs it (scripts/train.py)."""
    records = []
    for config in configs:
        record = train(config, log=quiet)
        write_record(config.record, record)
        records.append(record)
    return records


def checkpoint(config):
    return torch.load(config.out, weights_only=True)


@pytest.fixture
def float64_training(monkeypatch):
    """Networks built in float64 and fed float64 images: tiny batches' BatchNorm amplifies float32's
    rounding, which differs between a grouped and a plain convolution, to percents within a few steps;
    in float64 the fused path must give each run's own weights to the last digits."""
    from tlselect.training.models import Preprocess

    to_float32 = Preprocess.forward
    monkeypatch.setattr(Preprocess, "forward", lambda self, images: to_float32(self, images).double())
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_group_gives_each_run_what_it_gives_alone(data, tmp_path, backbone, float64_training):
    torch.manual_seed(11)
    weights = tmp_path / "init.pt"
    torch.save(StagedNet(backbone, 3).net.state_dict(), weights)
    alone = separately(group(data, tmp_path / "alone", backbone, weights))
    in_turn = train_group(group(data, tmp_path / "in_turn", backbone, weights), log=quiet, fuse=False)
    fused_configs = group(data, tmp_path / "fused", backbone, weights)
    fused = train_group(fused_configs, log=quiet)
    for one, sequential, fused_one, config in zip(alone, in_turn, fused, fused_configs, strict=True):
        validate_record(fused_one)
        assert read_record(config.record) == fused_one
        assert without_timings(sequential["curves"]) == without_timings(one["curves"])  # identical
        assert sequential["metrics"] == one["metrics"]
        for epoch, expected in zip(fused_one["curves"], one["curves"], strict=True):
            for key in ("train_loss", "val_loss"):  # the losses themselves are taken in float32
                assert epoch[key] == pytest.approx(expected[key], rel=1e-6), (config.run_id, key)
            for key in ("train_accuracy", "val_accuracy", "lr", "images"):
                assert epoch[key] == expected[key], (config.run_id, key)
        assert fused_one["metrics"]["test_accuracy"] == one["metrics"]["test_accuracy"]
        assert fused_one["metrics"]["test_loss"] == pytest.approx(one["metrics"]["test_loss"], rel=1e-6)
        assert fused_one["metrics"]["val_correct"] == one["metrics"]["val_correct"]
        expected = torch.load(tmp_path / "alone" / f"{config.run_id}.pt", weights_only=True)
        assert torch.equal(checkpoint(config)["test_predictions"], expected["test_predictions"])
        for name, value in checkpoint(config)["model"].items():  # an ordinary network's, its run's own
            assert torch.allclose(value, expected["model"][name], rtol=1e-9, atol=1e-12), (config.run_id, name)
    assert fused[0]["fused_with"] == ["b"] and fused[1]["fused_with"] == ["a"] and "fused_with" not in fused[2]


def test_a_killed_group_resumes_every_run_from_its_own_files(data, tmp_path):
    configs = group(data, tmp_path / "killed", "resnet18", "")[:2]
    configs[1] = dataclasses.replace(configs[1], init="scratch")

    def kill_in_epoch_two(message):
        if "epoch 2/2" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_group(configs, log=kill_in_epoch_two)
    assert all((tmp_path / "killed" / f"{name}.resume.pt").is_file() for name in ("a", "b"))
    resumed = train_group(configs, log=quiet)
    straight = train_group([dataclasses.replace(c, out=c.out + ".straight", record="") for c in configs], log=quiet)
    for one, expected in zip(resumed, straight, strict=True):
        assert one["resumed_from_epoch"] == 1 and one["status"] == "completed"
        assert without_timings(one["curves"]) == without_timings(expected["curves"])
        assert one["metrics"] == expected["metrics"]
    assert not list((tmp_path / "killed").glob("*.resume.pt"))
    messages = []
    assert train_group(configs, log=messages.append) == resumed  # finished runs are not trained again
    assert messages == [f"[{name}] already trained: {tmp_path / 'killed' / name}.pt" for name in ("a", "b")]


def test_a_diverging_run_does_not_stop_the_others(data, tmp_path, float64_training):
    configs = [
        run_config(data, tmp_path, name, epochs=3, lr=lr) for name, lr in (("steady", 0.05), ("diverging", 1e12))
    ]
    steady, diverging = train_group(configs, log=quiet)
    validate_record(diverging)
    assert diverging["status"] == "diverged" and diverging["metrics"]["test_accuracy"] is None
    assert len(diverging["curves"]) < 3 and checkpoint(configs[1])["status"] == "diverged"
    assert not (tmp_path / "diverging.resume.pt").exists() and read_record(configs[1].record)["status"] == "diverged"
    assert steady["status"] == "completed" and len(steady["curves"]) == 3  # on after the other diverged
    alone = train(dataclasses.replace(configs[0], out=str(tmp_path / "alone.pt"), record=""), log=quiet)
    for epoch, expected in zip(steady["curves"], alone["curves"], strict=True):
        assert epoch["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-6)
        assert epoch["val_accuracy"] == expected["val_accuracy"]
    assert steady["metrics"]["val_correct"] == alone["metrics"]["val_correct"]
