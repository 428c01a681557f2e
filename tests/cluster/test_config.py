"""Experiment config: YAML + overrides -> typed dataclasses; every mistake names key, value, expectation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

import training.config as training_config
from cluster.config import (
    REDACTED,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    load_config,
)
from pipeline import augment

REPO = Path(__file__).resolve().parents[2]
TINY = Path(__file__).with_name("tiny.yaml")
PAPER_CONFIGS = [REPO / "configs" / "imagenet_r50_relic.yaml", REPO / "configs" / "imagenet_r50_relicv2.yaml"]


def minimal(**sections) -> dict:
    raw = {"data": {"train": "/tmp/shards"}, "run": {"name": "t"}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def test_tiny_config_loads_with_overrides():
    cfg = load_config(TINY, ["data.train=/data/shards", "optim.base_lr=0.5", "scaling.num_workers=2"])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.data.train == "/data/shards"
    assert cfg.optim.base_lr == 0.5 and isinstance(cfg.optim.base_lr, float)
    assert cfg.per_worker_batch_size * cfg.scaling.num_workers == cfg.data.global_batch_size


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.name)
def test_paper_recipes(path):
    cfg = load_config(path, ["data.train=s3://bucket/imagenet/train"])
    assert cfg.data.global_batch_size == 4096
    assert cfg.optim.name == "lars"
    assert cfg.schedule.epochs == 1000
    assert cfg.scaling.use_gpu
    assert cfg.run.storage.startswith("s3://")
    assert cfg.model.arch == "resnet50"
    # 4096 must split over the workers of the recipe
    assert cfg.data.global_batch_size % cfg.scaling.num_workers == 0


def test_relicv2_recipe_has_small_crops():
    cfg = load_config(PAPER_CONFIGS[1])
    assert cfg.views.preset == "relicv2"
    options, recipe = cfg.views.options, cfg.views.recipe()
    assert options.num_small > 0 and recipe.num_large == options.num_large >= 2
    assert len(recipe.views) == options.num_large + options.num_small
    assert cfg.objective.pairs == "all" and cfg.model.batchnorm == "per_view" and cfg.model.sync_batchnorm
    assert recipe.mask_prob > 0
    # every value the recipe names has its source, and each says verified or assumed
    for key in (
        "views.options.num_large",
        "views.options.num_small",
        "views.options.mask_prob",
        "objective.pairs",
    ):
        assert cfg.sources[key].startswith(("verified:", "assumed:")), key


@pytest.mark.parametrize(
    ("path", "overrides"),
    [
        (TINY, []),
        (
            PAPER_CONFIGS[1],
            ["views.options.blur_p=[1.0, 0.1, 0.5, 0.5, 0.5, 0.5]", "views.options.scale=[0.2, 1.0]"],
        ),
        (PAPER_CONFIGS[0], ["views.options.scale=[[0.2, 1.0], [0.3, 1.0]]", "optim.grad_clip=1.0"]),
    ],
    ids=["tiny", "relicv2-options", "relic-per-view"],
)
def test_round_trip_through_yaml(path, overrides):
    cfg = load_config(path, ["data.train=/x", *overrides])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    # options left to the preset are not written out
    options = cfg.views.options
    assert set(yaml.safe_load(cfg.to_yaml())["views"]["options"]) == {
        f.name for f in dataclasses.fields(options) if getattr(options, f.name) is not None
    }


def test_override_values_are_parsed_as_yaml():
    raw = apply_overrides(
        {"a": {"b": 1}}, ["a.b=2", "a.c=0.5", "a.d=true", "a.e=null", "a.f=[1, 2]", "x.y.z=hello"]
    )
    assert raw == {"a": {"b": 2, "c": 0.5, "d": True, "e": None, "f": [1, 2]}, "x": {"y": {"z": "hello"}}}


def test_overrides_do_not_mutate_the_input():
    raw = {"a": {"b": 1}}
    apply_overrides(raw, ["a.b=2"])
    assert raw == {"a": {"b": 1}}


@pytest.mark.parametrize(
    ("overrides", "key", "fragments"),
    [
        (["optim.bogus=1"], "optim.bogus", ["unknown key", "base_lr"]),
        (["bogus.x=1"], "bogus", ["unknown key", "scaling"]),
        (["scaling.num_workers=two"], "scaling.num_workers", ["'two'", "integer"]),
        (["scaling.num_workers=1.5"], "scaling.num_workers", ["1.5", "integer"]),
        (["scaling.use_gpu=3"], "scaling.use_gpu", ["3", "true or false"]),
        (["views.preset=simclr"], "views.preset", ["'simclr'", "'relic'"]),
        (["scaling.num_workers=0"], "scaling.num_workers", ["> 0", "0"]),
        (["run.report_every=-1"], "run.report_every", ["> 0", "-1"]),
        (
            ["data.global_batch_size=30", "scaling.num_workers=4"],
            "data.global_batch_size",
            ["30", "num_workers=4"],
        ),
        (["scaling=3"], "scaling", ["mapping", "3"]),
        (["run.max_steps=0"], "run.max_steps", ["0"]),
        (["run.network_timeout_s=0"], "run.network_timeout_s", ["> 0", "0"]),
        (["scaling.resource_wait_s=-1"], "scaling.resource_wait_s", [">= 0", "-1"]),
        (["views.options.size=abc"], "views.options.size", ["'abc'", "integer"]),
        (["views.options.bogus=1"], "views.options.bogus", ["unknown key", "num_small", "blur_p"]),
        (["views.options.blur_p=[0.5, 2]"], "views.options.blur_p[1]", ["2", "<= 1"]),
        (["views.options.blur_p=[1.0, 0.1, 0.5]"], "views.options.blur_p", ["3 values for 2 views"]),
        (["views.options.num_small=2"], "views.options.num_small", ["relicv2 option", "2"]),
        (["views.options.scale=[0.2, 1.0, 0.5]"], "views.options.scale", ["[0.2, 1.0, 0.5]", "at most 2"]),
        (["schedule.epochs=2", "schedule.warmup_epochs=3"], "schedule.warmup_epochs", ["3", "epochs=2"]),
        (
            ["objective.base_momentum=0.99", "objective.final_momentum=0.9"],
            "objective.final_momentum",
            ["0.9", ">= base_momentum (0.99)"],
        ),
        (["scaling.backend=nccl"], "scaling.backend", ["'nccl'", "use_gpu"]),
        (["scaling.env_vars.OMP_NUM_THREADS=4"], "scaling.env_vars.OMP_NUM_THREADS", ["4", "a string"]),
    ],
)
def test_bad_values_name_key_value_and_expectation(overrides, key, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["data.train=/x", *overrides])
    assert info.value.key == key, str(info.value)
    message = str(info.value)
    assert key in message
    for fragment in fragments:
        assert fragment in message, message


def test_override_errors_name_the_command_line_and_file_errors_the_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["data.train=/x", "optim.base_lr=-1"])
    assert (info.value.key, info.value.source) == ("optim.base_lr", "command line (optim.base_lr=-1)")
    assert str(info.value).startswith("command line (optim.base_lr=-1): optim.base_lr: got integer -1")
    # a key created by an override is blamed on it, however deep the problem lies
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["data.train=/x", "bogus.x=1"])
    assert (info.value.key, info.value.source) == ("bogus", "command line (bogus.x=1)")
    # the last override of a key is the one in effect
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["data.train=/x", "optim.base_lr=-1", "optim.base_lr=-2"])
    assert info.value.source == "command line (optim.base_lr=-2)"
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("base_lr: 0.05", "base_lr: -1"))
    with pytest.raises(ConfigError) as info:
        load_config(bad, ["data.train=/x", "optim.weight_decay=0.0"])
    assert (info.value.key, info.value.source) == ("optim.base_lr", str(bad))


SECRETS = {
    "WANDB_API_KEY": "wandb-secret-1",
    "HF_TOKEN": "hf-secret-2",
    "DB_PASSWORD": "db-secret-3",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-4",
    "AWS_ACCESS_KEY_ID": "aws-id-5",
}


def test_secrets_are_redacted_where_shown_and_kept_for_the_workers():
    env = {**SECRETS, "NCCL_SOCKET_IFNAME": "eth0"}
    cfg = config_from_dict(minimal(scaling={"env_vars": env}))
    text = cfg.to_yaml()
    shown = cfg.to_dict()["scaling"]["env_vars"]
    for secret in SECRETS.values():
        assert secret not in text and secret not in str(cfg.to_dict())
    assert shown == {**dict.fromkeys(SECRETS, REDACTED), "NCCL_SOCKET_IFNAME": "eth0"}
    assert yaml.safe_load(text)["scaling"]["env_vars"] == shown
    # the workers' form keeps the real values and rebuilds the same config
    assert cfg.to_dict(redact=False)["scaling"]["env_vars"] == env
    assert config_from_dict(cfg.to_dict(redact=False)) == cfg
    # a stored (redacted) config still loads, e.g. from a checkpoint
    assert config_from_dict(yaml.safe_load(text)).scaling.env_vars["HF_TOKEN"] == REDACTED


def test_secrets_are_redacted_in_errors():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["data.train=/x", "scaling.env_vars.HF_TOKEN=[hf-secret-2]"])
    assert info.value.key == "scaling.env_vars.HF_TOKEN"
    assert "hf-secret-2" not in str(info.value)
    assert info.value.source == "command line (scaling.env_vars.HF_TOKEN=***)"


def test_one_section_convention_everywhere():
    assert augment.SECTION_CONFIG == training_config.SECTION_CONFIG
    assert ExperimentConfig.__pydantic_fields__["run"].description


def test_training_section_validation_is_reported_with_the_section_key():
    # training.config's own __post_init__ checks surface under their dotted key
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["data.train=/x", "objective.temperature=0"])
    assert info.value.key == "objective.temperature"
    assert "0" in str(info.value)


def test_missing_required_key():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"run": {"name": "x"}})
    assert info.value.key == "data"
    with pytest.raises(ConfigError) as info:
        config_from_dict({"data": {}, "run": {"name": "x"}})
    assert info.value.key == "data.train"


def test_malformed_override_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TINY, ["optim.base_lr"])
    with pytest.raises(ConfigError, match=r"run\.name is a string"):
        load_config(TINY, ["run.name.x=1"])
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*YAML"):
        load_config(bad)


def test_defaults_and_types():
    cfg = config_from_dict(minimal(scaling={"cpus_per_worker": 2}))
    assert cfg.scaling.cpus_per_worker == 2.0 and isinstance(cfg.scaling.cpus_per_worker, float)
    assert cfg.scaling.torch_backend == "gloo"
    assert config_from_dict(minimal(scaling={"use_gpu": True})).scaling.torch_backend == "nccl"
    assert cfg.to_dict()["run"]["name"] == "t"


def test_sources_name_real_keys_say_verified_or_assumed_and_yield_to_overrides(tmp_path):
    sources = {
        "objective.temperature": "assumed: a common value",
        "views.options.num_small": "verified: somewhere",
    }
    cfg = config_from_dict(minimal(sources=sources))
    assert cfg.sources == sources and "sources" in yaml.safe_load(cfg.to_yaml())
    with pytest.raises(ConfigError, match=r"sources\.objective\.temprature: names no value"):
        config_from_dict(minimal(sources={"objective.temprature": "assumed: typo"}))
    with pytest.raises(ConfigError, match=r"sources\.objective\.temperature: expected a text starting with"):
        config_from_dict(minimal(sources={"objective.temperature": "0.1 from the paper"}))

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal(sources=sources)))
    cfg = load_config(path, ["objective.temperature=0.2", "views.options={}"])
    assert cfg.sources == {
        "objective.temperature": "overridden: command line",
        "views.options.num_small": "overridden: command line",
    }
    assert load_config(path, ["optim.base_lr=0.3"]).sources == sources
