"""The trainer: records match the schema, cached training equals uncached, killed runs resume."""

import dataclasses

import numpy as np
import pytest
import torch

from tlselect.core.registry import read_record, validate_record, write_record
from tlselect.training.loop import augment_batch, augment_draws
from tlselect.training.options import TrainConfig, TrainingError
from tlselect.training.trainer import TrainingState, train


def config(tensor_data, tmp_path, **kw):
    base = dict(
        data=str(tensor_data),
        out=str(tmp_path / "model.pt"),
        epochs=2,
        batch_size=32,
        lr=0.05,
        precision="float32",
        device="cpu",
        seed=7,
        eval_batch_size=64,
    )
    base.update(kw)
    return TrainConfig(**base)


def quiet(_):
    pass


def test_record_matches_schema_and_learns(tensor_data, tmp_path):
    record = train(config(tensor_data, tmp_path, epochs=3, freeze="none"), log=quiet)
    validate_record(record)
    write_record(tmp_path / "r.json", record)
    assert read_record(tmp_path / "r.json")["run_id"] == record["run_id"]
    assert record["status"] == "completed" and len(record["curves"]) == 3
    assert record["metrics"]["test_accuracy"] is not None
    hits = record["metrics"]["val_correct"]  # the final model's per-image validation hits
    assert len(hits) == 32 and hits.count("1") / len(hits) == pytest.approx(record["metrics"]["val_accuracy"])
    assert record["timings"]["train_seconds"] > 0 and record["throughput_images_per_second"] > 0
    assert (tmp_path / "model.pt").is_file() and not (tmp_path / "model.resume.pt").exists()


def test_same_seed_gives_identical_metrics(tensor_data, tmp_path):
    a = train(config(tensor_data, tmp_path / "a"), log=quiet)
    b = train(config(tensor_data, tmp_path / "b"), log=quiet)
    assert [c["train_loss"] for c in a["curves"]] == [c["train_loss"] for c in b["curves"]]
    assert a["metrics"] == b["metrics"]


def test_cached_prefix_training_matches_uncached(tensor_data, tmp_path, monkeypatch):
    # A pretrained-like init: the prefix must be the same weights in both runs.
    from tlselect.training.models import StagedNet

    torch.manual_seed(3)
    weights = tmp_path / "init.pt"
    torch.save(StagedNet("resnet18", 4).net.state_dict(), weights)
    common = dict(init=str(weights), freeze="layer3", augment=False, epochs=3)
    plain = train(config(tensor_data, tmp_path / "plain", **common), log=quiet)
    cached = train(config(tensor_data, tmp_path / "cached", cache_features=True, **common), log=quiet)
    for p, c in zip(plain["curves"], cached["curves"], strict=True):
        assert c["train_loss"] == pytest.approx(p["train_loss"], rel=1e-4, abs=1e-5)
        assert c["val_accuracy"] == pytest.approx(p["val_accuracy"], abs=1 / 32 + 1e-9)
    a = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)["test_predictions"]
    b = torch.load(tmp_path / "cached" / "model.pt", weights_only=True)["test_predictions"]
    assert (a == b).float().mean() >= 0.95


def test_cache_features_refuses_augmentation_and_unfrozen(tensor_data, tmp_path):
    with pytest.raises(TrainingError, match="not exact"):
        train(config(tensor_data, tmp_path, freeze="layer3", cache_features=True, augment=True), log=quiet)
    with pytest.raises(TrainingError, match="needs a frozen prefix"):
        train(config(tensor_data, tmp_path, cache_features=True, augment=False), log=quiet)


def test_interrupted_run_resumes_from_last_epoch(tensor_data, tmp_path):
    cfg = config(tensor_data, tmp_path / "killed", epochs=3)

    def crash_in_epoch_two(message):
        if "epoch 2/3" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=crash_in_epoch_two)
    assert (tmp_path / "killed" / "model.resume.pt").is_file()
    resumed = train(cfg, log=quiet)
    straight = train(dataclasses.replace(cfg, out=str(tmp_path / "straight" / "model.pt")), log=quiet)
    assert resumed["resumed_from_epoch"] == 1
    assert [c["train_loss"] for c in resumed["curves"]] == [c["train_loss"] for c in straight["curves"]]
    assert resumed["metrics"] == straight["metrics"]


def test_divergence_is_recorded(tensor_data, tmp_path):
    record = train(config(tensor_data, tmp_path, lr=1e6, epochs=3, optimizer="sgd"), log=quiet)
    validate_record(record)
    assert record["status"] == "diverged"
    assert record["metrics"]["test_accuracy"] is None


def test_augmentation_crops_and_flips_whole_batches():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 8, 8)
    out = augment_batch(images, *augment_draws(torch.Generator().manual_seed(0), 2, pad=2), pad=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    # every output row of each image is a shifted (maybe flipped) window of the zero-padded input
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for n in range(2):
        found = any(
            torch.equal(out[n], window) or torch.equal(out[n], window.flip(-1))
            for dy in range(5)
            for dx in range(5)
            for window in [padded[n, :, dy : dy + 8, dx : dx + 8]]
        )
        assert found


def test_continuing_a_run_equals_training_longer(tensor_data, tmp_path):
    short = config(tensor_data, tmp_path / "short", epochs=1, schedule="constant", keep_state=True)
    train(short, log=quiet)
    longer = dataclasses.replace(short, out=str(tmp_path / "cont" / "model.pt"), epochs=3, keep_state=False)
    continued = train(dataclasses.replace(longer, continue_from=short.out), log=quiet)
    straight = train(dataclasses.replace(longer, out=str(tmp_path / "straight" / "model.pt")), log=quiet)
    assert continued["continued_from"] == short.out and len(continued["curves"]) == 3
    assert [c["train_loss"] for c in continued["curves"]] == [c["train_loss"] for c in straight["curves"]]
    with pytest.raises(TrainingError, match="differs in lr"):
        train(dataclasses.replace(longer, lr=0.5, continue_from=short.out), log=quiet)


def test_a_probe_trains_on_cached_features_and_records_only_what_it_uses(tensor_data, tmp_path):
    from tlselect.training.options import PROBE_UNUSED

    layer = tmp_path / "features" / "layer4"
    layer.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val", "test"):
        labels = torch.load(tensor_data / f"{split}.pt", weights_only=True)["labels"]
        features = torch.randn(len(labels), 8, 2, 2, generator=generator)
        features[torch.arange(len(labels)), labels] += 4  # one channel per class: a probe must learn it
        np.save(layer / f"{split}.npy", features.numpy().astype(np.float16))
    probe = config(tensor_data, tmp_path, kind="probe", name="probe_layer4", features=str(layer), layer="layer4",
                   pool=1, epochs=20, lr=0.1, augment=True)  # fmt: skip
    record = train(probe, log=quiet)
    validate_record(record)
    assert record["kind"] == "probe" and record["name"] == "probe_layer4"
    assert not PROBE_UNUSED & set(record["config"]) and record["config"]["layer"] == "layer4"
    assert record["parameters"]["trainable"] == 8 * 4 + 4  # one linear layer on 8 pooled channels, 4 classes
    assert record["metrics"]["val_accuracy"] > 0.9
    with pytest.raises(TrainingError, match="needs --features"):
        train(dataclasses.replace(probe, features=""), log=quiet)


def test_resume_file_holds_cudas_rng_state_only_when_cuda_runs(monkeypatch):
    model = torch.nn.Linear(2, 2)
    state = TrainingState(TrainConfig(), model, torch.optim.SGD(model.parameters(), lr=0.1), torch.Generator(), 8)
    assert not torch.cuda.is_initialized() and "cuda_rng" not in state.snapshot()  # a CPU run

    restored = []  # on a GPU: every device's state is saved and put back (simulated here)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([1, 2], dtype=torch.uint8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda rng, index: restored.append((rng.tolist(), index)))
    saved = state.snapshot()
    assert saved["cuda_rng"][0].tolist() == [1, 2]
    assert state.restore(saved) == 0 and restored == [([1, 2], 0)]

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # a GPU run's file resumed on the CPU
    assert state.restore(saved) == 0 and len(restored) == 1


@pytest.mark.parametrize("write_cost, expected", [(0.0, [1, 2, 3]), (5.0, [1])])
def test_resume_files_take_at_most_a_tenth_of_the_time(tensor_data, tmp_path, monkeypatch, write_cost, expected):
    """With a clock that only the resume-file writes move, epochs take no time: a free write follows
    every epoch but the last, a costly one only the first (it would take more than a tenth)."""
    from tlselect.training import trainer

    clock = [0.0]
    written = []
    real_save = trainer.save_torch

    def save(path, obj):
        if str(path).endswith(".resume.pt"):
            written.append(len(obj["curves"]))
            clock[0] += write_cost
        real_save(path, obj)

    monkeypatch.setattr(trainer, "save_torch", save)
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: clock[0])
    record = train(config(tensor_data, tmp_path, epochs=4), log=quiet)
    assert record["status"] == "completed" and written == expected
