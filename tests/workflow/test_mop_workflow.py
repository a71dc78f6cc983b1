"""Model hopper parallelism in the workflow: snakemake on a tiny archive trains one policy as a chain
of sub-epoch jobs over 2 partitions for 2 epochs; each job reads its own partition, each epoch
covers both, each job continues the previous one; then a re-run has nothing to do."""

import pytest
import torch
from helpers import job_counts, snakemake, tiny_study, write_study

from tlselect.core.registry import read_record
from tlselect.search import mop


@pytest.fixture(scope="module")
def mop_study(tmp_path_factory, tiny_archive):
    workdir = tmp_path_factory.mktemp("mop")
    tiny = tiny_study(
        tiny_archive,
        device="cpu",
        train={"epochs": 2, "batch_size": 4},
        policies=[{"name": "scratch", "init": "scratch", "freeze": "none"}],
        features={"layers": [], "inits": []},
        mop={"enabled": True, "policies": ["scratch"], "partitions": 2},
    )
    write_study(workdir, tiny)
    snakemake(workdir)
    return workdir


def test_each_sub_epoch_reads_its_partition_and_continues_the_last(mop_study):
    parts = [torch.load(mop_study / f"results/mop/partitions/p{k}.pt", weights_only=True) for k in range(2)]
    train = torch.load(mop_study / "results/data/train.pt", weights_only=True)
    assert sum(len(p["labels"]) for p in parts) == len(train["labels"])
    assert sorted(torch.cat([p["labels"] for p in parts]).tolist()) == sorted(train["labels"].tolist())
    (run,) = [d for d in (mop_study / "results/mop").iterdir() if d.name.startswith("mop-scratch")]
    records = [read_record(run / f"s{k}.json") for k in range(4)]
    used = [int(r["config"]["partition"][-4]) for r in records]  # .../p<k>.pt
    assert used == mop.chains(1, 2, 2)[0]
    assert sorted(used[:2]) == sorted(used[2:]) == [0, 1]  # every partition once per epoch
    for k, record in enumerate(records):
        assert record["data"]["train"] == len(parts[used[k]]["labels"])  # the job saw only its partition
        assert len(record["curves"]) == k + 1 and record["status"] == "completed"
        assert record["continued_from"] == (str(run.relative_to(mop_study) / f"s{k - 1}.pt") if k else None)
    assert records[-1]["curves"][:3] == records[2]["curves"]  # the chain carries the earlier sub-epochs


def test_rerun_does_nothing(mop_study):
    result = snakemake(mop_study, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr, job_counts(result.stdout)
