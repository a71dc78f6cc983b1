"""Pools of any timm or torchvision model: stages found and checked, patterns expanded under a cap,
SHiFT's successive halving over data, and features keyed by image content."""

from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import SCHEMA, write_image_folder
from snakemake.utils import validate

from tlselect.config import ConfigError, load_and_check
from tlselect.core import backbones
from tlselect.core.backbones import BackboneError
from tlselect.data.folders import make_subset
from tlselect.report import answer
from tlselect.search import jobs, shift
from tlselect.training import zoo
from tlselect.training.models import StagedNet
from tlselect.training.store import Embedder, image_hashes

# one small model per family: timm's and torchvision's
FAMILIES = ["resnet10t", "mobilenetv3_small_050", "convnext_atto", "regnetx_002", "vit_tiny_patch16_224", "mnasnet0_5"]


@pytest.fixture(autouse=True)
def _backbone_cache(tmp_path_factory, monkeypatch):
    """One backbone cache for this module's tests, outside the user's."""
    monkeypatch.setenv(backbones.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "backbones.json"))


@functools.cache
def discovered(name: str) -> backbones.BackboneSpec:
    return zoo.discover(name)


def staged(name: str, classes: int = 3) -> StagedNet:
    backbones._RESOLVED[name] = discovered(name)
    torch.manual_seed(0)
    return StagedNet(name, classes, 32).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_any_model_runs_stage_by_stage_like_itself(name):
    net = staged(name)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        whole = net(images)
        assert whole.shape == (2, 3)
        for cut in (1, 2, len(net.stage_names) - 1):  # cuts compose to the whole network
            assert torch.allclose(net(net(images, 0, cut), cut), whole, atol=1e-5)
    net.freeze_through(net.spec.stage_names[1])
    frozen = {id(p) for index in (1, 2) for m in net._stage_modules[index] for p in m.parameters()}
    assert frozen and all(not p.requires_grad for p in net.parameters() if id(p) in frozen)
    assert net.net.get_submodule(net.spec.classifier).weight.requires_grad


def test_a_vits_class_token_and_position_embedding_freeze_with_stage_one():
    net = staged("vit_tiny_patch16_224")
    net.freeze_through("stage1")
    assert not net.net.pos_embed.requires_grad and not net.net.cls_token.requires_grad
    net.freeze_through("none")
    assert net.net.pos_embed.requires_grad


def test_a_nonexistent_name_stops_the_config_check_naming_it(config):
    config["search"] = {"enabled": True, "backbones": ["resnet18", "no_such_network"]}
    with pytest.raises(ConfigError, match=r"search.backbones: unknown backbone 'no_such_network'.*spelling"):
        load_and_check(config, SCHEMA, validate)


def test_a_model_whose_stages_cannot_be_found_is_named_with_the_fix():
    with pytest.raises(BackboneError, match=r"'squeezenet1_1': its stages cannot be found.*BACKBONES"):
        zoo.discover("squeezenet1_1")  # its classifier is a convolution
    with pytest.raises(BackboneError, match=r"'densenet121': its stages cannot be found.*does not reproduce"):
        zoo.discover("densenet121")  # its forward applies a ReLU between modules, after stage 1


def test_patterns_expand_in_order_and_a_pattern_matching_too_many_is_refused():
    names = zoo.expand(["convnext_atto", "efficientnet_b[0-2]", "convnext_atto"], cap=10)
    assert names == ["convnext_atto", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2"]
    assert zoo.expand(["timm.efficientnet_b[0-1]"], cap=10) == ["timm.efficientnet_b0", "timm.efficientnet_b1"]
    with pytest.raises(BackboneError, match=r"'resnet\*' matches \d+ models .*more than search.max_backbones \(5\)"):
        zoo.expand(["resnet*"], cap=5)
    with pytest.raises(BackboneError, match="matches no torchvision or timm model"):
        zoo.expand(["nothing_like_this_*"], cap=5)


def test_the_config_check_expands_search_backbones_once_through_the_cache(config, capsys):
    config["search"] = {"enabled": True, "backbones": ["convnext_a*o", "resnet18"]}
    load_and_check(config, SCHEMA, validate)
    assert config["search"]["backbones"] == ["convnext_atto", "resnet18"]
    assert "search.backbones: 2 models: convnext_atto, resnet18" in capsys.readouterr().err
    cached = backbones._cached()
    assert cached["specs"]["convnext_atto"]["library"] == "timm" and "resnet18" not in cached["specs"]
    backbones._RESOLVED.pop("convnext_atto")  # a fresh process: read back from the cache
    assert backbones.resolve(["convnext_a*o", "resnet18"], 50) == ["convnext_atto", "resnet18"]
    assert backbones.backbone_spec("convnext_atto").stage_names == ["stage1", "stage2", "stage3", "stage4"]


# ---------------------------------------------------------------------------------------------
# SHiFT's successive halving over data


def test_shifts_schedule_for_twenty_models():
    rounds = shift.schedule(20, eta=2)
    assert [r.survivors for r in rounds] == [20, 10, 5, 3, 2]
    assert [r.chunks for r in rounds] == [1, 3, 7, 13, 23]  # r_k = floor(B / (S_k K)), B = 20 * 5
    assert shift.chunk_size(230, rounds) == 10  # the last round's survivors read all images
    assert shift.schedule(1, 2) == []


def test_successive_halving_drops_models_before_they_read_every_chunk():
    rng = np.random.RandomState(0)
    labels = np.arange(120) % 3
    quality = {f"m{i}": i / 8 for i in range(8)}  # m7's features carry the most signal
    base = {m: rng.normal(size=(120, 4)) for m in quality}
    val_labels = np.arange(30) % 3
    val_base = {m: rng.normal(size=(30, 4)) for m in quality}
    read: dict[str, set] = {m: set() for m in quality}

    def features(model, indices):
        read[model].update(indices.tolist())
        signal = np.eye(3)[labels[indices]] * quality[model]
        return np.hstack([base[model][indices], signal])

    def validation(model):
        return np.hstack([val_base[model], np.eye(3)[val_labels] * quality[model]]), val_labels

    result = shift.successive_halving(list(quality), labels, features, validation, eta=2, seed=3)
    rounds = shift.schedule(8, 2)
    chunk = shift.chunk_size(120, rounds)
    reached = shift.final_scores(result)
    dropped_first = [m for m, (k, _) in reached.items() if k == 0]
    assert len(dropped_first) == 4
    for model in dropped_first:  # never read past the first round's chunks
        assert len(read[model]) == rounds[0].chunks * chunk < 120
    assert sum(len(read[m]) for m in dropped_first) < 4 * 120 / 3
    full = shift.full_proxy(list(quality), labels, features, validation)
    assert result.winner == full.winner in {"m6", "m7"}


def test_weighted_tau_interval_over_seeds():
    results = [shift.Result("b", [{"model": m, "round": r, "images": 1, "score": s}
                                  for m, r, s in (("a", 0, 0.2), ("b", 1, 0.9), ("c", 0, 0.5))])]  # fmt: skip
    interval = shift.tau_interval(results * 3, {"a": 0.1, "b": 0.8, "c": 0.4})
    assert interval["tau"] == pytest.approx(1.0) and interval["seeds"] == 3
    assert shift.tau_interval(results, {"zzz": 0.1})["tau"] is None


def grid_record(backbone, init, lr, val):
    """A grid run's record with what :func:`jobs.best_finetuned` reads."""
    config = {"backbone": backbone, "init": init, "freeze": "none", "lr": lr}
    return {"name": f"{backbone}-{init}-{lr}", "status": "completed", "config": config,
            "metrics": {"val_accuracy": val, "test_accuracy": 1 - val}}  # fmt: skip


def test_shifts_ranking_is_compared_with_the_best_fine_tuned_run_of_each_arm():
    arms = [("a", "scratch", ""), ("b", "scratch", ""), ("c", "source", "")]
    reached = (("a/scratch", 0, 0.2), ("b/scratch", 0, 0.5), ("c/source", 1, 0.1))  # c: the later round ranks first
    ranked = shift.Result("c", [{"model": m, "round": r, "images": 1, "score": s} for m, r, s in reached])
    # the best run of each arm by validation accuracy: a 0.3, b 0.5, c 0.9; the worse ones must not count
    agree = [grid_record(b, i, lr, v) for b, i, lr, v in
             (("a", "scratch", 0.1, 0.3), ("a", "scratch", 0.2, 0.1), ("b", "scratch", 0.1, 0.05),
              ("b", "scratch", 0.2, 0.5), ("c", "source", 0.1, 0.9), ("c", "source", 0.2, 0.0))]  # fmt: skip
    against = jobs.finetune_tau([ranked] * 3, arms, agree)
    assert against["finetuned"] == {"a/scratch": 0.3, "b/scratch": 0.5, "c/source": 0.9}
    assert against["tau"]["tau"] == pytest.approx(1.0) and against["tau"]["seeds"] == 3
    reverse = [grid_record(b, i, 0.1, v) for b, i, v in (("a", "scratch", 0.9), ("b", "scratch", 0.5),
                                                          ("c", "source", 0.1))]  # fmt: skip
    against = jobs.finetune_tau([ranked], arms, reverse)
    assert against["tau"]["tau"] == pytest.approx(-1.0) and against["tau"]["high"] == pytest.approx(-1.0)
    assert jobs.finetune_tau([ranked], arms, [])["tau"]["tau"] is None  # no grid: nothing to compare


# ---------------------------------------------------------------------------------------------
# Features keyed by image content


def decoded_training_images(root, train_per_class: int) -> torch.Tensor:
    """The subset's training and validation images, decoded."""
    from tlselect.data.tensors import load_split, write_subset

    out = root.parent / f"data-{train_per_class}"
    write_subset(root, out, None, train_per_class, 2, 2, 32, seed=0, skip_unreadable=False)
    return torch.cat([load_split(out / f"{split}.pt")[0] for split in ("train", "val")])


def test_an_appended_archive_extracts_only_the_new_images(tmp_path):
    root = write_image_folder(tmp_path / "images", train=10, test=2)
    images = decoded_training_images(root, 10)
    first = Embedder("resnet10t", "scratch", tmp_path / "store")
    backbones._RESOLVED["resnet10t"] = discovered("resnet10t")
    before = first(images, image_hashes(images))
    assert first.computed == len(images) == 30  # 3 classes x 10
    # the grown archive: two more images per class; the same seed picks the same subset from the old one
    assert make_subset(root, None, 10, 2, 2, seed=0) == make_subset(root, None, 10, 2, 2, seed=0)
    write_image_folder(tmp_path / "more", train=12, test=2)
    for path in (tmp_path / "more" / "train").glob("*/001[01].*"):
        path.rename(root / "train" / path.parent.name / path.name)
    grown = decoded_training_images(root, 12)
    again = Embedder("resnet10t", "scratch", tmp_path / "store")  # a fresh job reads the shards
    after = again(grown, image_hashes(grown))
    new = set(image_hashes(grown)) - set(image_hashes(images))
    assert again.computed == len(new) == 6  # the two new images of each class, nothing else
    by_hash = dict(zip(image_hashes(grown), after, strict=True))
    for h, row in zip(image_hashes(images), before, strict=True):
        if h in by_hash:
            assert np.array_equal(by_hash[h], row)
    assert Embedder("resnet10t", "scratch", tmp_path / "store", seed=1).store.index == {}  # another model


def test_run_shift_reads_chunks_and_counts_what_each_model_computed(tmp_path, tensor_data):
    arms = [(name, "scratch", "") for name in ("resnet10t", "mobilenetv3_small_050", "regnetx_002")]
    for name, _, _ in arms:
        backbones._RESOLVED[name] = discovered(name)
    result = jobs.run_shift(tensor_data, arms, tmp_path / "store", tmp_path / "shift.csv", tmp_path / "s.json",
                            seeds=2)  # fmt: skip
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["seeds"][0] == {"seed": 0, "winner": result.winner} and summary["seeds"][1]["seed"] == 1
    rounds = shift.schedule(3, 2)
    chunk = shift.chunk_size(96, rounds)
    assert summary["winner"] == result.winner and summary["full_proxy_images"] == 3 * (96 + 32)
    computed = sorted(summary["computed"].values())
    assert computed[0] == rounds[0].chunks * chunk + 32 < 96 + 32  # dropped after round 0, val read once
    assert computed[-1] == 96 + 32
    assert max(summary["computed_all_seeds"].values()) == 96 + 32  # the second order reuses the store
    table = pd.read_csv(tmp_path / "shift.csv")  # what the report shows
    assert answer.shift_rounds(table)["model"].iloc[0] == result.winner
    assert f"picks **{result.winner}** from 3 models after 2 rounds" in answer.shift_sentence(table)


def test_pretrained_weights_come_from_the_weights_folder(tmp_path, capsys):
    import sys

    from helpers import REPO
    from safetensors.torch import save_file

    from tlselect.training import models

    sys.path.insert(0, str(REPO / "scripts"))
    import prepare_data

    pretrained = staged("convnext_atto", classes=1000)  # a model as its library saves it
    save_file(
        {k: v.contiguous() for k, v in pretrained.net.state_dict().items()}, tmp_path / "convnext_atto.safetensors"
    )
    dest = tmp_path / "resources/weights/convnext_atto-imagenet.pth"
    args = ["weights", "--backbone", "convnext_atto", "--folder", str(tmp_path), "--out", str(dest)]
    assert prepare_data.main(args) == 0
    model = StagedNet("convnext_atto", 3, 32)
    assert models.initialize(model, "imagenet", str(dest))["skipped_keys"] == ["head.fc.bias", "head.fc.weight"]
    assert torch.equal(model.net.stem[0].weight, pretrained.net.stem[0].weight)
    missing = ["weights", "--backbone", "regnetx_002", "--folder", str(tmp_path), "--out", str(tmp_path / "r.pth")]
    backbones._RESOLVED["regnetx_002"] = discovered("regnetx_002")
    assert prepare_data.main(missing) == 2
    assert "no regnetx_002.safetensors, regnetx_002.pth or regnetx_002.pt in" in capsys.readouterr().err


def test_the_per_layer_cache_computes_only_new_images_and_matches_a_full_extraction(tmp_path):
    from tlselect.data.tensors import write_subset
    from tlselect.training.features import cache_layer, open_features

    root = write_image_folder(tmp_path / "images", train=6, test=2)

    def extract(data, out, store):
        logged = []
        for layer, previous in (("layer1", ""), ("layer2", "layer1")):
            inputs = data if not previous else out / previous
            cache_layer(inputs, out / layer, layer, previous, "resnet18", log=logged.append, data=data, store=store)
        return logged

    def computed(logged, layer, split):
        line = next(line for line in logged if line.startswith(f"{layer} {split}: "))
        return int(line.split()[2])

    write_subset(root, tmp_path / "data", None, 6, 2, 2, 32, seed=0, skip_unreadable=False)
    extract(tmp_path / "data", tmp_path / "first", tmp_path / "store")
    write_image_folder(tmp_path / "more", train=7, test=2)  # one more image per class
    for path in (tmp_path / "more" / "train").glob("*/0006.*"):
        path.rename(root / "train" / path.parent.name / path.name)
    write_subset(root, tmp_path / "grown", None, 7, 2, 2, 32, seed=0, skip_unreadable=False)
    logged = extract(tmp_path / "grown", tmp_path / "again", tmp_path / "store")
    for layer in ("layer1", "layer2"):  # three new images over train and val, none in test
        assert sum(computed(logged, layer, split) for split in ("train", "val")) == 3
        assert computed(logged, layer, "test") == 0
    extract(tmp_path / "grown", tmp_path / "fresh", None)  # no store: every image computed
    for split in ("train", "val", "test"):  # equal up to float16 rounding of batch-dependent float32 sums
        np.testing.assert_allclose(
            open_features(tmp_path / "again/layer2" / f"{split}.npy").astype(np.float32),
            open_features(tmp_path / "fresh/layer2" / f"{split}.npy").astype(np.float32),
            rtol=5e-3,
            atol=5e-3,
        )
