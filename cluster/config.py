"""Typed experiment configuration: one YAML file plus ``key=value`` overrides, validated up front.

An experiment is eight sections, each a config section in the project's one convention (a keyword-only
pydantic dataclass with ``training.config.SECTION_CONFIG``, a docstring on every field, constraints
checked by pydantic)::

    data       where the shards are (local or s3://), global batch, reader knobs, kNN monitor splits
    views      the augmentation recipe: a preset of ``pipeline.augment`` plus its typed options
    model      training.config.ModelConfig       (encoder, projector)
    objective  training.config.ObjectiveConfig   (temperature, alpha, target network, queue, ...)
    optim      training.config.OptimConfig       (optimiser, base lr, weight decay, ...)
    schedule   training.config.ScheduleConfig    (epochs, warm-up, ...)
    run        name, storage (local dir or s3://), reporting/checkpoint cadence, failures, seed
    scaling    workers, GPUs, resources per worker, placement

``load_config(path, overrides)`` reads the YAML, applies overrides such as ``optim.base_lr=0.3`` or
``scaling.num_workers=4`` (dotted keys; values parsed as YAML scalars, so ``4`` is an int, ``0.3`` a
float, ``true`` a bool, ``null`` None, ``[1, 2]`` a list), validates every section with pydantic and
checks the constraints between sections (the global batch must split evenly over the workers, ...).
Anything wrong raises ``ConfigError`` naming where the bad value came from (the file, or the override
on the command line), the dotted key, the value and what was expected — on the driver, before any Ray
worker is started.

Secrets: the value of every key whose name contains SECRET, TOKEN, PASSWORD or KEY (any case; e.g.
``scaling.env_vars.WANDB_API_KEY``) is shown and stored as ``***``: in ``to_yaml()``, ``to_dict()``,
error messages and override echoes. Only ``to_dict(redact=False)``, the form sent to the workers, holds
the real values.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import ErrorDetails

from pipeline.augment import PresetError, PresetName, PresetOptions, ViewRecipe, preset
from pipeline.plan import allowed_world_sizes
from training.config import SECTION_CONFIG, ModelConfig, ObjectiveConfig, OptimConfig, ScheduleConfig

#: What a secret value is shown and stored as.
REDACTED = "***"
_SECRET_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "KEY")


class ConfigError(ValueError):
    """A configuration problem a user can fix: ``message`` says what is wrong, ``key`` is the dotted
    path, ``source`` where the value came from (the file, or ``command line (key=value)``)."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        self.message = message
        self.key = key
        self.source = source
        where = " ".join(p for p in (f"{source}:" if source else "", key or "") if p)
        super().__init__(f"{where}: {message}" if where else message)


# --------------------------------------------------------------------------------------------------
# Sections owned by the cluster layer.


@dataclass(kw_only=True, config=SECTION_CONFIG)
class DataConfig:
    """Where the training shards are and how they are read."""

    train: Annotated[str, Field(min_length=1)]
    """Training shards: a shard directory or a manifest.json URL, local path or s3://bucket/prefix."""
    global_batch_size: PositiveInt = 256
    """Images per optimiser step summed over all workers (ReLIC/BYOL use 4096); a multiple of
    ``scaling.num_workers``."""
    shuffle_buffer: PositiveInt = 1000
    """Sample-level shuffle buffer of each data partition (samples); a worker holds one per partition
    it reads."""
    reader_workers: PositiveInt = 1
    """Reader threads per training worker (``ShardReader`` ``num_workers``), one per partition at most."""
    partitions: PositiveInt | None = None
    """Contiguous partitions the epoch's samples are cut into (``pipeline.plan``): global step k takes
    ``global_batch_size / partitions`` samples of each, and a run of W workers gives each
    ``partitions / W`` of them. The order of an epoch depends on it, never on the number of workers: a
    run resumed with any number of workers that divides it continues exactly. It must divide
    ``global_batch_size``; null: the largest ``scaling.num_workers`` x ``reader_workers``. More
    partitions allow more sizes (``global_batch_size`` itself allows every divisor of the batch), at
    the cost of more shard streams and shuffle buffers open in each worker."""
    endpoint_url: str | None = None
    """S3-compatible endpoint for the shards (MinIO, moto); None: RELIC_S3_ENDPOINT_URL/AWS_ENDPOINT_URL*."""
    profile: str | None = None
    """AWS profile for the shards; None: the default credential chain."""
    knn_train: str | None = None
    """Labelled shards whose features form the online kNN monitor's memory bank (usually the train
    split); None: the training shards when they carry labels."""
    knn_val: str | None = None
    """Held-out labelled shards the kNN monitor classifies; None disables the monitor."""
    knn_max_samples: PositiveInt = 2000
    """At most this many samples are taken from each kNN split (the monitor must stay cheap)."""
    true_labels: str | None = None
    """Shards holding the true label of every training sample under the same keys (e.g. the fully
    labelled set a ``--label-fraction`` set was built from): the SemPPL run's monitor reports how
    often its pseudo-labels of unlabelled samples are right (``pseudo_label_accuracy``). The
    objective never sees these labels. None: no such metric."""


@dataclass(kw_only=True, config=SECTION_CONFIG)
class ViewsConfig:
    """The augmentation recipe and the DALI pipeline that applies it."""

    preset: PresetName = "relic"
    """Preset of ``pipeline.augment.preset``: "relic" (2 x 224), "relicv2" (+ small crops), "demo"."""
    options: PresetOptions = Field(default_factory=PresetOptions)
    """Overrides of the preset, e.g. ``{num_small: 4}`` for relicv2 or ``{size: 32}``."""
    num_threads: PositiveInt = 2
    """DALI CPU threads per worker (without a GPU they are shared out over at most 4 DALI pipelines)."""
    prefetch: PositiveInt = 2
    """Batches prepared ahead of the training step."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """View tensor dtype handed to the model (the memory format follows model.channels_last)."""

    def recipe(self) -> ViewRecipe:
        """The views this section describes; raises ``PresetError`` when the options do not fit the preset."""
        return preset(self.preset, self.options)


@dataclass(kw_only=True, config=SECTION_CONFIG)
class RunConfig:
    """The run's identity, storage and cadences."""

    name: Annotated[str, Field(min_length=1)]
    """Run name: the directory under ``storage``; a new run with the same name resumes from its checkpoints."""
    storage: str = "runs"
    """Where runs live: local directory or s3://bucket/prefix (checkpoints, TensorBoard, config, metrics)."""
    endpoint_url: str | None = None
    """S3-compatible endpoint for ``storage``; None: from the environment like the data endpoint."""
    network_timeout_s: PositiveFloat = 30.0
    """Seconds the driver gives each storage check before any worker starts (reading a shard manifest
    of ``data.*``, writing a probe file to ``storage``); a store that has not answered by then stops
    the run with an error naming the key, the endpoint and this limit. Single S3 requests have their
    own connect/read timeouts and retries everywhere (``pipeline.storage.S3_CONFIG``)."""
    seed: NonNegativeInt = 0
    """Seed for model initialisation, shard order and augmentation."""
    report_every: PositiveInt = 10
    """Report metrics every this many optimiser steps (every rank reports; rank 0's are logged)."""
    checkpoint_every: NonNegativeInt = 0
    """Checkpoint every this many steps (0: none between epoch ends); checkpoints are also written at
    the end of every ``checkpoint_every_epochs``-th epoch and at the end of training."""
    checkpoint_every_epochs: NonNegativeInt = 1
    """Checkpoint at the end of every this many epochs (0: never at epoch ends, only the above)."""
    num_to_keep: PositiveInt | None = 2
    """Checkpoints kept in storage (the oldest are deleted first); None keeps all."""
    max_failures: Annotated[int, Field(ge=-1)] = 3
    """Worker-group restarts from the last checkpoint before the run fails (-1: unlimited)."""
    knn_every: NonNegativeInt = 1
    """Run the kNN monitor every this many epochs (0: never); needs data.knn_val."""
    knn_k: PositiveInt = 20
    """Neighbours that vote in the kNN monitor's weighted k-NN (Wu et al. 2018, arXiv 1805.01978,
    sec. 3.4; DINO's k-NN evaluation, Caron et al. 2021, arXiv 2104.14294: k = 20)."""
    knn_temperature: PositiveFloat = 0.07
    """Temperature of the kNN monitor's similarity-weighted vote (DINO's k-NN evaluation: 0.07)."""
    tensorboard: bool = True
    """Write TensorBoard event files from rank 0 under <storage>/<name>/tensorboard."""
    max_steps: PositiveInt | None = None
    """Stop after this many optimiser steps in total (None: train for schedule.epochs). The schedules
    are still laid out for the full run, so this truncates a run rather than shortening it."""

    @field_validator("name")
    @classmethod
    def _one_path_segment(cls, name: str) -> str:
        if "/" in name:
            raise ValueError("expected a name without '/'")
        return name


@dataclass(kw_only=True, config=SECTION_CONFIG)
class ScalingConfig:
    """Workers, their resources and how they are placed."""

    num_workers: PositiveInt | tuple[PositiveInt, PositiveInt] = 2
    """Training workers (one process, one DDP rank each; one per GPU on GPU nodes); ``[min, max]`` for
    an elastic run that Ray Train resizes between min and max as nodes come and go. The global batch
    stays the same at every size (``global_batch_size / workers`` per worker), and so do the
    learning-rate schedule and the step count; a run only ever uses a number of workers that divides
    ``data.partitions``."""
    use_gpu: bool = False
    """One GPU per worker, DALI on the GPU ("mixed" decode), NCCL."""
    cpus_per_worker: PositiveFloat = 1.0
    """CPUs Ray reserves for each worker (its DALI threads and readers run on them)."""
    gpus_per_worker: float = 1.0
    """GPUs per worker when use_gpu (fractions allowed by Ray; 1 is the normal choice); > 0 with use_gpu."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Extra custom Ray resources per worker, e.g. ``{accelerator_type:H100: 0.001}``."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement group strategy for the workers (PACK fills nodes, SPREAD one per node)."""
    resize_check_s: NonNegativeFloat = 60.0
    """Elastic runs: how often Ray Train looks whether more workers could run (Ray's
    ``elastic_resize_monitor_interval_s``); growing restarts the group from the last checkpoint."""
    resource_wait_s: NonNegativeFloat = 300.0
    """Seconds to wait for a joined Ray cluster to offer ``num_workers`` x the per-worker resources
    (nodes joining, an autoscaler scaling up, other jobs releasing theirs), logging what is missing,
    before the run stops with an error naming the numbers; 0: stop at once. A Ray instance started by
    this process (``relic train`` without ``RAY_ADDRESS``) cannot grow: too large a request fails at once."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; "auto": nccl with GPUs, gloo without; nccl needs use_gpu."""
    env_vars: dict[str, str] = Field(default_factory=dict)
    """Environment variables for every worker (e.g. NCCL_SOCKET_IFNAME). Values of secret-named
    variables (``*KEY*``, ``*TOKEN*``, ...) are redacted wherever the config is shown or stored."""

    @field_validator("gpus_per_worker")
    @classmethod
    def _positive_with_gpu(cls, gpus: float, info: ValidationInfo) -> float:
        if info.data.get("use_gpu") and gpus <= 0:
            raise ValueError("expected > 0 with use_gpu: true")
        return gpus

    @field_validator("backend")
    @classmethod
    def _nccl_needs_gpu(cls, backend: str, info: ValidationInfo) -> str:
        if backend == "nccl" and info.data.get("use_gpu") is False:
            raise ValueError("expected 'gloo' or 'auto' on CPU ('nccl' needs use_gpu: true)")
        return backend

    @field_validator("num_workers")
    @classmethod
    def _range(cls, workers: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(workers, tuple) and workers[0] > workers[1]:
            raise ValueError(f"expected [min, max] with min <= max, got {list(workers)}")
        return workers

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def torch_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if self.use_gpu else "gloo"


@dataclass(kw_only=True, config=SECTION_CONFIG)
class ExperimentConfig:
    """One experiment: every section, validated together (``config_from_dict``)."""

    data: DataConfig
    """The training shards and their reading."""
    views: ViewsConfig = Field(default_factory=ViewsConfig)
    """The augmentation recipe."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Encoder and critic."""
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    """The ReLIC objective and its target network."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """The optimiser."""
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    """Training length and learning-rate schedule."""
    run: RunConfig
    """Name, storage and cadences of the run."""
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    """Workers and their resources."""
    sources: dict[str, str] = Field(default_factory=dict)
    """Where values of this config come from: a dotted key (``objective.temperature``,
    ``views.options.num_large``) mapped to ``"verified: <paper, section or table>"`` or
    ``"assumed: <why this value>"``. Printed with the config; a key set on the command line has its
    entry replaced by ``"overridden: command line"``."""

    @property
    def partitions(self) -> int:
        """``data.partitions``, or its default: the largest number of workers x ``data.reader_workers``."""
        return self.data.partitions or self.scaling.max_workers * self.data.reader_workers

    @property
    def world_sizes(self) -> list[int]:
        """The numbers of workers this run may train with (``scaling.num_workers`` that divide the
        partitions)."""
        return allowed_world_sizes(self.partitions, self.scaling.min_workers, self.scaling.max_workers)

    @property
    def per_worker_batch_size(self) -> int:
        """The batch of each worker at the largest number of workers."""
        return self.data.global_batch_size // max(self.world_sizes)

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe) that ``config_from_dict`` turns back into this config.

        Redacted (secret-named values replaced by ``***``) for everything that is shown or stored:
        logs, run_info, reports, ``config.yaml``. ``redact=False`` keeps the real values: only for the
        workers, which rebuild the config they run from it.
        """
        plain = _EXPERIMENT.dump_python(self, mode="json")
        return redacted(plain) if redact else plain

    def to_yaml(self) -> str:
        """The redacted ``to_dict()`` as YAML: what ``--print-config`` prints and ``config.yaml`` holds."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


_EXPERIMENT = TypeAdapter(ExperimentConfig)


# --------------------------------------------------------------------------------------------------
# Secrets


def is_secret_name(name: str) -> bool:
    """Whether a key names a secret: it contains SECRET, TOKEN, PASSWORD or KEY, in any case.

    ``AWS_ACCESS_KEY_ID`` counts: an identifier, but one half of a credential pair.
    """
    upper = name.upper()
    return any(marker in upper for marker in _SECRET_MARKERS)


def redacted(tree: Any) -> Any:
    """A copy of a plain config tree with the value of every secret-named key replaced by ``***``."""
    if isinstance(tree, Mapping):
        return {k: REDACTED if is_secret_name(str(k)) else redacted(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redacted(v) for v in tree]
    return tree


def redact_override(item: str) -> str:
    """A ``key=value`` command-line argument as it may be shown: ``key=***`` when the key names a
    secret; any other argument unchanged."""
    key, sep, _ = item.partition("=")
    return f"{key}={REDACTED}" if sep and any(is_secret_name(p) for p in key.split(".")) else item


# --------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read ``path`` (YAML), apply ``key=value`` overrides, validate. Raises ConfigError whose source
    is the override when the bad key was set on the command line, else the file."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror or e}", source=source) from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", source=source) from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping of sections at the top level, got {_kind(raw)}", source=source)
    try:
        return config_from_dict(
            _overridden_sources(apply_overrides(raw, overrides, source=source), overrides), source=source
        )
    except ConfigError as error:
        override = _override_behind(error.key, raw, overrides)
        if override is None:
            raise
        raise ConfigError(error.message, key=error.key, source=_command_line(override)) from error


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], *, source: str | None = None) -> dict:
    """A copy of ``raw`` with each ``dotted.key=value`` set; the value is parsed as a YAML scalar/flow.

    Whether the key exists is checked later, by validation, so that a typo in an override and a typo
    in the file get the same message. ``source`` (the file ``raw`` came from) is not blamed for a
    malformed override: its errors name the command line.
    """
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"override {redact_override(item)!r}: expected key=value with a dotted key, e.g. optim.base_lr=0.3",
                source=_command_line(item),
            )
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(
                f"value {text!r} is not a YAML value: {e}", key=key, source=_command_line(item)
            ) from e
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                prefix = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"cannot set {key}: {prefix} is a {_kind(child)} ({child!r}), not a section",
                    key=key,
                    source=_command_line(item),
                )
            node = child
        node[parts[-1]] = value
    return out


def config_from_dict(raw: Mapping[str, Any], *, source: str | None = None) -> ExperimentConfig:
    """Build and validate an ExperimentConfig from a nested mapping (a parsed YAML document, or
    ``to_dict()``). Raises ConfigError at the dotted key of the first problem."""
    try:
        cfg = _EXPERIMENT.validate_python(raw)
    except ValidationError as e:
        raise _config_error(e, source=source) from e
    validate(cfg, source=source)
    return cfg


def validate(cfg: ExperimentConfig, *, source: str | None = None) -> None:
    """Constraints that span sections (each section validates its own fields on construction)."""
    scaling, batch, partitions = cfg.scaling, cfg.data.global_batch_size, cfg.partitions
    if not scaling.elastic and batch % scaling.num_workers:
        n = scaling.num_workers
        raise ConfigError(
            f"{batch} does not split evenly over scaling.num_workers={n} "
            f"(expected a multiple of {n}, e.g. {max(n, batch // n * n)})",
            key="data.global_batch_size",
            source=source,
        )
    if batch % partitions:
        raise ConfigError(
            f"{batch} does not split over {partitions} data partitions (data.partitions, by default "
            f"the largest scaling.num_workers x data.reader_workers): expected a multiple of {partitions}",
            key="data.global_batch_size",
            source=source,
        )
    if not cfg.world_sizes:
        raise ConfigError(
            f"no number of workers in {scaling.num_workers} divides the {partitions} data partitions "
            f"(data.partitions); a run can only use a number of workers that divides them",
            key="scaling.num_workers",
            source=source,
        )
    if not scaling.elastic and scaling.num_workers not in cfg.world_sizes:
        raise ConfigError(
            f"{scaling.num_workers} workers cannot share the {partitions} data partitions equally "
            f"(data.partitions must be a multiple of scaling.num_workers)",
            key="data.partitions",
            source=source,
        )
    _check_sources(cfg, source)
    try:
        cfg.views.recipe()
    except PresetError as e:
        raise ConfigError(str(e), key=f"views.options.{e.option}", source=source) from e
    if not cfg.scaling.use_gpu and cfg.views.dtype == "float16":
        raise ConfigError(
            "float16 views need scaling.use_gpu: true (CPU convolutions lack float16); use float32 or bfloat16",
            key="views.dtype",
            source=source,
        )


#: How each ``sources`` entry starts.
SOURCE_KINDS = ("verified:", "assumed:", "overridden:")


def _leaf_keys(tree: Any, prefix: str = "") -> set[str]:
    if isinstance(tree, Mapping) and tree:
        return set().union(*(_leaf_keys(v, f"{prefix}{k}.") for k, v in tree.items()))
    return {prefix[:-1]}


def _check_sources(cfg: ExperimentConfig, source: str | None) -> None:
    """Every ``sources`` key names a value of the config (or a view preset option) and says whether
    it is verified or assumed."""
    plain = cfg.to_dict(redact=False)
    plain.pop("sources", None)
    known = _leaf_keys(plain) | {f"views.options.{name}" for name in PresetOptions.__dataclass_fields__}
    for key, text in cfg.sources.items():
        if key not in known:
            raise ConfigError(
                "names no value of this config (expected a dotted key such as objective.temperature)",
                key=f"sources.{key}",
                source=source,
            )
        if not text.startswith(SOURCE_KINDS):
            raise ConfigError(
                f"expected a text starting with {' or '.join(SOURCE_KINDS[:2])}, got {text!r}",
                key=f"sources.{key}",
                source=source,
            )


def _overridden_sources(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``raw`` with the ``sources`` entry of every key an override set (or set a section above)
    replaced by ``overridden: command line``: the file's claim no longer describes the value."""
    sources = raw.get("sources")
    if not isinstance(sources, dict):
        return raw
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.startswith("sources."):
            continue
        for named in list(sources):
            if named == key or named.startswith(f"{key}."):
                sources[named] = "overridden: command line"
    return raw


def describe_recipe(recipe: ViewRecipe) -> str:
    """The views a recipe makes, one line each, as YAML comments (``--print-config`` prints them under
    the config, which stays one YAML document that ``load_config`` reads back)."""
    lines = [
        f"# views: {recipe.num_large} large + {len(recipe.views) - recipe.num_large} small "
        f"(views.recipe(); large views masked with probability {recipe.mask_prob})"
    ]
    for i, view in enumerate(recipe.views):
        kind = "large" if i < recipe.num_large else "small"
        fields = ", ".join(f"{name}={value}" for name, value in dataclasses.asdict(view).items())
        lines.append(f"#   {i} {kind}: {fields}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Error reports: pydantic's error location -> dotted key; its error type -> what was expected.

_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "string_too_short": "at least {min_length} character(s)",
    "list_type": "a list",
    "tuple_type": "a list",
    "too_short": "at least {min_length} values",
    "too_long": "at most {max_length} values",
    "dict_type": "a mapping",
    "dataclass_type": "a mapping",
    "literal_error": "one of {expected}",
    "greater_than": "> {gt}",
    "greater_than_equal": ">= {ge}",
    "less_than": "< {lt}",
    "less_than_equal": "<= {le}",
}


def _config_error(error: ValidationError, *, source: str | None) -> ConfigError:
    """The first problem pydantic found in an ExperimentConfig, as a ConfigError at its dotted key."""
    details = error.errors()[0]
    kind, loc = details["type"], details["loc"]
    too_few_values = kind == "missing" and bool(loc) and isinstance(loc[-1], int)  # a fixed-length list
    key, holder = _locate(loc[:-1] if too_few_values else loc)
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        known = sorted(getattr(holder, "__pydantic_fields__", {}))
        return ConfigError(f"unknown key; expected one of: {', '.join(known)}", key=key, source=source)
    if kind == "missing" and not too_few_values:
        return ConfigError("required key is missing", key=key, source=source)
    shown = REDACTED if key and any(is_secret_name(p) for p in key.split(".")) else _shown(details["input"])
    return ConfigError(f"got {shown}, {_expectation(details)}", key=key, source=source)


def _expectation(details: ErrorDetails) -> str:
    kind = details["type"]
    ctx = details.get("ctx", {})
    if kind == "value_error":  # raised by a field validator, phrased "expected ..."
        return str(ctx["error"])
    if kind == "missing":  # an element of a fixed-length list
        return f"expected a value at index {details['loc'][-1]}"
    if kind in _EXPECTED:
        return "expected " + _EXPECTED[kind].format(**ctx)
    return details["msg"][:1].lower() + details["msg"][1:]


def _locate(loc: tuple[int | str, ...]) -> tuple[str | None, Any]:
    """The dotted key of a pydantic error location in an ExperimentConfig (``views.options.blur_p[1]``)
    and the type that holds its last part (the section, for an unknown key)."""
    key = ""
    node: Any = ExperimentConfig
    holder: Any = None
    for part in loc:
        node = _strip_optional(node)
        if typing.get_origin(node) in (typing.Union, types.UnionType):
            node = None  # a union's location names the member that was tried: not a key
            continue
        holder = node
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
        node = _child_type(node, part)
    return key or None, holder


def _strip_optional(tp: Any) -> Any:
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
            continue
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(members) == 1:
            tp = members[0]
            continue
        return tp


def _child_type(tp: Any, part: int | str) -> Any:
    fields = getattr(tp, "__pydantic_fields__", None)
    if fields is not None:
        return fields[part].annotation if part in fields else None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict and args:
        return args[1]
    if origin is list and args:
        return args[0]
    if origin is tuple and isinstance(part, int) and part < len(args) and args[-1] is not Ellipsis:
        return args[part]
    return None


def _shown(value: Any) -> str:
    return f"{_kind(value)} {value!r}"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        tuple: "list",
        dict: "mapping",
    }.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------------------
# Which override a problem comes from


def _command_line(override: str) -> str:
    return f"command line ({redact_override(override)})"


def _override_behind(key: str | None, file_raw: Mapping[str, Any], overrides: Sequence[str]) -> str | None:
    """The override responsible for the value at ``key``: the last one that set ``key`` or a key above
    it, or that created the section ``key`` lies in (a section absent from the file); None: the file."""
    if key is None:
        return None
    for item in reversed(overrides):
        anchor = _first_new_key(file_raw, item.partition("=")[0].strip())
        if key == anchor or key.startswith((f"{anchor}.", f"{anchor}[")):
            return item
    return None


def _first_new_key(raw: Mapping[str, Any], dotted: str) -> str:
    """The shortest prefix of ``dotted`` that ``raw`` does not hold, or ``dotted`` itself."""
    parts = dotted.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        if not isinstance(node, Mapping) or part not in node:
            return ".".join(parts[: i + 1])
        node = node[part]
    return dotted
