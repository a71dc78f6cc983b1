"""Config: the schema fills defaults and names bad keys; the semantic checks name the key."""

import pytest
import yaml
from helpers import SCHEMA, default_config
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from tlselect.config import ConfigError, check, check_renamed, coerce_cli_values, load_and_check
from tlselect.runs import policy_runs


def test_default_config_is_valid_and_complete():
    config = default_config()
    check(config)
    assert {p["name"] for p in config["policies"]} == {
        "scratch",
        "finetune",
        "freeze_early",
        "freeze_most",
        "linear_probe",
    }
    assert len(policy_runs(config)) == 5


def test_schema_fills_defaults():
    config = {"policies": [{"name": "only"}]}
    validate(config, SCHEMA)
    assert config["train"]["epochs"] >= 1 and config["data"]["train_per_class"] == 500
    assert config["policies"][0]["init"] == "pretrained"


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda c: c["train"].update(epochs=-1), "epochs"),
        (lambda c: c["data"].update(bogus=1), "bogus"),
        (lambda c: c["policies"][0].update(lrr=0.1), "lrr"),
        (lambda c: c.update(device="tpu"), "device"),
        (lambda c: c["train"].update(optimizer="lbfgs"), "optimizer"),
        (lambda c: c["policies"][1].update(name="has space"), "name"),
        (lambda c: c.update(search={"shift": {"seeds": 0}}), "seeds"),
    ],
)
def test_schema_rejects_bad_values_naming_the_key(change, key):
    config = default_config(validated=False)
    change(config)
    with pytest.raises(WorkflowError) as info:
        validate(config, SCHEMA)
    assert key in str(info.value.args) or key in str(info.value.__cause__ or info.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(backbone="vgg99"), "backbone: unknown backbone 'vgg99'"),
        (lambda c: c["policies"][2].update(freeze="layer7"), r"policies\[2\] \(freeze_early\).freeze"),
        (lambda c: c["policies"][1].update(name="scratch"), "duplicate policy name 'scratch'"),
        (lambda c: c["policies"][0].update(init="nonsense"), r"policies\[0\] \(scratch\).init"),
        (lambda c: c["data"].update(val_per_class=600), "data.val_per_class"),
        (lambda c: c["data"].update(archive="/no/such.tar.gz"), "data.archive"),
        (lambda c: c["policies"][4].update(augment=True), "cache_features"),
        (lambda c: c["policies"][0].update(freeze="layer2"), "init scratch"),
    ],
)
def test_semantic_checks_name_the_key(change, message):
    config = default_config()
    change(config)
    with pytest.raises(ConfigError, match=message):
        check(config)


def test_nested_command_line_values_get_the_schema_types():
    """Snakemake hands the values of --config 'key={nested: value}' over as strings."""
    schema = yaml.safe_load(open(SCHEMA))
    given = {
        "search": {"enabled": "true", "lrs": ["0.1", "0.02"], "train": {"epochs": "3"}},
        "data": {"train_per_class": "100", "classes": ["1", "2"], "archive": "x.tar"},
        "policies": [{"name": "a", "lr": "0.5", "augment": "false", "freeze": "none"}],
        "speedups": {"enabled": "maybe"},
    }
    config = coerce_cli_values(given, schema)
    assert config["search"] == {"enabled": True, "lrs": [0.1, 0.02], "train": {"epochs": 3}}
    assert config["data"] == {"train_per_class": 100, "classes": ["1", "2"], "archive": "x.tar"}  # names stay
    assert config["policies"][0] == {"name": "a", "lr": 0.5, "augment": False, "freeze": "none"}
    assert config["speedups"]["enabled"] == "maybe"  # not a boolean: left for the schema to reject
    with pytest.raises(WorkflowError):
        validate(config, SCHEMA)


@pytest.mark.parametrize(
    ("old", "new"), [("warm_start", "fork_server"), ("benchmarks", "speedups"), ("train.amp", "plan.precision")]
)
def test_a_key_of_an_earlier_version_is_refused_naming_what_replaced_it(old, new):
    config = default_config()
    block, _, key = old.rpartition(".")
    (config[block] if block else config)[key] = True
    with pytest.raises(ConfigError, match=new.replace(".", r"\.")) as error:
        check_renamed(config)
    assert old.split(".")[-1] in str(error.value)
    check_renamed(default_config())  # the current keys pass


def test_load_and_check_types_validates_and_checks_the_config_naming_the_key():
    config = default_config(validated=False)
    config["search"] = {"enabled": "true"}  # as --config 'search={enabled: true}' leaves it
    assert load_and_check(config, SCHEMA, validate) is config
    assert config["search"]["enabled"] is True and config["search"]["q"] >= 1  # typed, defaults filled in
    config["data"]["val_per_class"] = config["data"]["train_per_class"]
    with pytest.raises(ConfigError, match=r"^invalid configuration: data\.val_per_class"):
        load_and_check(config, SCHEMA, validate)
    with pytest.raises(WorkflowError):  # the schema's own error
        load_and_check({**default_config(), "seed": "x"}, SCHEMA, validate)
