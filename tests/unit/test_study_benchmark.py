"""The study-level benchmark's plain script (benchmarks/plain_study.py): the baseline the workflow is
compared with. (The benchmark run end to end: tests/workflow/test_study_benchmark_workflow.py.)"""

from __future__ import annotations

import sys

from helpers import REPO


def test_the_plain_script_trains_only_the_unfrozen_parameters():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import plain_study
    import torch
    import torchvision

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 2)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    model = torchvision.models.resnet18(num_classes=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, frozen = plain_study.POLICIES["freeze_most"]
    result = plain_study.run("t", model, {"train": loader, "val": loader}, 1, 0.1, frozen)
    after = model.state_dict()
    assert torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert torch.equal(before["layer3.0.conv1.weight"], after["layer3.0.conv1.weight"])
    assert not torch.equal(before["layer4.0.conv1.weight"], after["layer4.0.conv1.weight"])
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    assert result["test_accuracy"] is None and 0 <= result["val_accuracy"] <= 1
