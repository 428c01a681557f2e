"""Typed experiment configuration: one YAML file plus ``key=value`` overrides, validated up front.

An experiment is eight sections, each a ``kw_only`` dataclass::

    data       where the shards are (local or s3://), global batch, reader knobs, kNN monitor splits
    views      the augmentation recipe: a preset of ``pipeline.augment`` plus overrides
    model      training.config.ModelConfig       (encoder, projector, target network)
    objective  training.config.ObjectiveConfig   (temperature, alpha, queue, ...)
    optim      training.config.OptimConfig       (optimiser, base lr, weight decay, ...)
    schedule   training.config.ScheduleConfig    (epochs, warm-up, EMA momentum, ...)
    run        name, storage (local dir or s3://), reporting/checkpoint cadence, failures, seed
    scaling    workers, GPUs, resources per worker, placement

``load_config(path, overrides)`` reads the YAML, applies overrides such as ``optim.base_lr=0.3`` or
``scaling.num_workers=4`` (dotted keys; values parsed as YAML scalars, so ``4`` is an int, ``0.3`` a
float, ``true`` a bool, ``null`` None, ``[1, 2]`` a list), converts every value to the declared type
and checks the cross-section constraints (the global batch must split evenly over the workers, ...).
Anything wrong raises ``ConfigError`` naming the file, the dotted key, the value and what was
expected — on the driver, before any Ray worker is started.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from training.config import ModelConfig, ObjectiveConfig, OptimConfig, ScheduleConfig


class ConfigError(ValueError):
    """A configuration problem a user can fix: ``key`` is the dotted path, ``source`` the file."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        self.key = key
        self.source = source
        where = " ".join(p for p in (f"{source}:" if source else "", key or "") if p)
        super().__init__(f"{where}: {message}" if where else message)


# --------------------------------------------------------------------------------------------------
# Sections owned by the cluster layer. Fields carry their meaning in the comment above them.


@dataclass(kw_only=True)
class DataConfig:
    # Training shards: a shard directory or a manifest.json URL, local path or s3://bucket/prefix.
    train: str
    # Global batch size: images per optimiser step summed over all workers (ReLIC/BYOL use 4096).
    global_batch_size: int = 256
    # Sample-level shuffle buffer of each reader (samples).
    shuffle_buffer: int = 1000
    # Reader threads/processes per training worker (ShardReader num_workers).
    reader_workers: int = 1
    # S3-compatible endpoint for the shards (MinIO, moto); None: RELIC_S3_ENDPOINT_URL/AWS_ENDPOINT_URL*.
    endpoint_url: str | None = None
    # AWS profile for the shards; None: the default credential chain.
    profile: str | None = None
    # Labelled shards whose features form the online kNN monitor's memory bank (usually the train
    # split); None: the training shards when they carry labels.
    knn_train: str | None = None
    # Held-out labelled shards the kNN monitor classifies; None disables the monitor.
    knn_val: str | None = None
    # At most this many samples are taken from each kNN split (the monitor must stay cheap).
    knn_max_samples: int = 2000

    def __post_init__(self) -> None:
        _positive(self, "global_batch_size", "shuffle_buffer", "reader_workers", "knn_max_samples")
        if not self.train:
            raise ValueError("train: expected a shard directory or manifest URL, got an empty string")


@dataclass(kw_only=True)
class ViewsConfig:
    # Preset of pipeline.augment.preset(): "relic" (2 x 224), "relicv2" (+ small crops), "demo".
    preset: Literal["relic", "relicv2", "demo"] = "relic"
    # Keyword overrides passed to the preset, e.g. {num_small: 4} for relicv2 or {size: 32}.
    options: dict[str, Any] = field(default_factory=dict)
    # DALI CPU threads per worker (without a GPU they are shared out over at most 4 DALI pipelines).
    num_threads: int = 2
    # Batches prepared ahead of the training step.
    prefetch: int = 2
    # View tensor dtype handed to the model (the memory format follows model.channels_last).
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        _positive(self, "num_threads", "prefetch")


@dataclass(kw_only=True)
class RunConfig:
    # Run name: the directory under `storage`; a new run with the same name resumes from its checkpoints.
    name: str
    # Where runs live: local directory or s3://bucket/prefix (checkpoints, TensorBoard, config, metrics).
    storage: str = "runs"
    # S3-compatible endpoint for `storage`; None: from the environment like the data endpoint.
    endpoint_url: str | None = None
    # Seed for model initialisation, shard order and augmentation.
    seed: int = 0
    # Report metrics every this many optimiser steps (every rank reports; rank 0's are logged).
    report_every: int = 10
    # Checkpoint every this many steps (0: none between epoch ends); checkpoints are also written
    # at the end of every `checkpoint_every_epochs`-th epoch and at the end of training.
    checkpoint_every: int = 0
    # Checkpoint at the end of every this many epochs (0: never at epoch ends, only the above).
    checkpoint_every_epochs: int = 1
    # Checkpoints kept in storage (the oldest are deleted first).
    num_to_keep: int | None = 2
    # Worker-group restarts from the last checkpoint before the run fails (-1: unlimited).
    max_failures: int = 3
    # Run the kNN monitor every this many epochs (0: never); needs data.knn_val.
    knn_every: int = 1
    knn_k: int = 20
    knn_temperature: float = 0.07
    # Write TensorBoard event files from rank 0 under <storage>/<name>/tensorboard.
    tensorboard: bool = True
    # Stop after this many optimiser steps in total (None: train for schedule.epochs). The schedules
    # are still laid out for the full run, so this truncates a run rather than shortening it.
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name: expected a non-empty name without '/', got {self.name!r}")
        _positive(self, "report_every", "knn_k")
        _non_negative(self, "checkpoint_every", "checkpoint_every_epochs", "knn_every", "seed")
        if self.num_to_keep is not None and self.num_to_keep < 1:
            raise ValueError(f"num_to_keep: expected null or >= 1, got {self.num_to_keep}")
        if self.max_failures < -1:
            raise ValueError(f"max_failures: expected -1 (unlimited) or >= 0, got {self.max_failures}")
        if self.knn_temperature <= 0:
            raise ValueError(f"knn_temperature: expected > 0, got {self.knn_temperature}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps: expected null or >= 1, got {self.max_steps}")


@dataclass(kw_only=True)
class ScalingConfig:
    # Training workers (one process, one DDP rank each; one per GPU on GPU nodes).
    num_workers: int = 2
    # One GPU per worker, DALI on the GPU ("mixed" decode), NCCL.
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # GPUs per worker when use_gpu (fractions allowed by Ray; 1 is the normal choice).
    gpus_per_worker: float = 1.0
    # Extra custom Ray resources per worker, e.g. {accelerator_type:H100: 0.001}.
    resources: dict[str, float] = field(default_factory=dict)
    # Ray placement group strategy for the workers (PACK fills nodes, SPREAD one per node).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # torch.distributed backend; "auto": nccl with GPUs, gloo without.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Environment variables for every worker (e.g. NCCL_SOCKET_IFNAME). Not for secrets.
    env_vars: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive(self, "num_workers", "cpus_per_worker")
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ValueError(f"gpus_per_worker: expected > 0 with use_gpu, got {self.gpus_per_worker}")
        if self.backend == "nccl" and not self.use_gpu:
            raise ValueError("backend: 'nccl' needs use_gpu: true; use 'gloo' or 'auto' on CPU")

    @property
    def torch_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if self.use_gpu else "gloo"


@dataclass(kw_only=True)
class ExperimentConfig:
    data: DataConfig
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    @property
    def per_worker_batch_size(self) -> int:
        return self.data.global_batch_size // self.scaling.num_workers

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe): what is logged and stored with the run."""
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read ``path`` (YAML), apply ``key=value`` overrides, convert, validate. Raises ConfigError."""
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
    return config_from_dict(apply_overrides(raw, overrides, source=source), source=source)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], *, source: str | None = None) -> dict:
    """A copy of ``raw`` with each ``dotted.key=value`` set; the value is parsed as a YAML scalar/flow.

    Whether the key exists is checked later, against the dataclasses, so that a typo in an override
    and a typo in the file get the same message.
    """
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"override {item!r}: expected key=value with a dotted key, e.g. optim.base_lr=0.3",
                source="command line",
            )
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(
                f"value {text!r} is not a YAML value: {e}", key=key, source="command line"
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
                    source="command line",
                )
            node = child
        node[parts[-1]] = value
    return out


def config_from_dict(raw: Mapping[str, Any], *, source: str | None = None) -> ExperimentConfig:
    """Build and validate an ExperimentConfig from a nested mapping (a parsed YAML document)."""
    cfg = _build(ExperimentConfig, raw, prefix="", source=source)
    validate(cfg, source=source)
    return cfg


def validate(cfg: ExperimentConfig, *, source: str | None = None) -> None:
    """Constraints that span sections (each section validates itself on construction)."""
    n = cfg.scaling.num_workers
    if cfg.data.global_batch_size % n:
        raise ConfigError(
            f"{cfg.data.global_batch_size} does not split evenly over scaling.num_workers={n} "
            f"(expected a multiple of {n}, e.g. {max(n, cfg.data.global_batch_size // n * n)})",
            key="data.global_batch_size",
            source=source,
        )
    from pipeline.augment import preset  # pure dataclasses; DALI is imported only to build graphs

    try:
        preset(cfg.views.preset, **cfg.views.options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{e}", key="views.options", source=source) from e
    if not cfg.scaling.use_gpu and cfg.views.dtype == "float16":
        raise ConfigError(
            "float16 views need scaling.use_gpu: true (CPU convolutions lack float16); use float32 or bfloat16",
            key="views.dtype",
            source=source,
        )


# --------------------------------------------------------------------------------------------------
# Generic dataclass <- mapping conversion with messages that name the key.


def _build(cls: type, raw: Any, *, prefix: str, source: str | None) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"expected a mapping (section {cls.__name__}), got {_kind(raw)} {raw!r}",
            key=prefix or None,
            source=source,
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = _join(prefix, str(unknown[0]))
        raise ConfigError(
            f"unknown key; expected one of: {', '.join(sorted(fields))}", key=key, source=source
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(
                    f"required key is missing ({_describe(hints[name])})", key=key, source=source
                )
            continue
        kwargs[name] = _convert(raw[name], hints[name], key=key, source=source)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        # Section __post_init__ messages start with the field name ("base_lr: expected > 0, got -1").
        # Section checks name their field first: "base_lr: ..." here, "optim.base_lr: ..." in training.
        msg = str(e)
        head, sep, rest = msg.partition(":")
        name = head.strip().rsplit(".", 1)[-1]
        if sep and name in fields:
            raise ConfigError(rest.strip(), key=_join(prefix, name), source=source) from e
        raise ConfigError(msg, key=prefix or None, source=source) from e


def _convert(value: Any, tp: Any, *, key: str, source: str | None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=key, source=source)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key=key, source=source)
            except ConfigError:
                continue
        raise ConfigError(f"got {_kind(value)} {value!r}, expected {_describe(tp)}", key=key, source=source)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(
            f"got {value!r}, expected one of {', '.join(repr(a) for a in args)}", key=key, source=source
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"got {_kind(value)} {value!r}, expected true or false", key=key, source=source)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"got {_kind(value)} {value!r}, expected an integer", key=key, source=source)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"got {_kind(value)} {value!r}, expected a number", key=key, source=source)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"got {_kind(value)} {value!r}, expected a string", key=key, source=source)
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"got {_kind(value)} {value!r}, expected {_describe(tp)}", key=key, source=source
            )
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(
                    f"got {len(value)} values {list(value)!r}, expected {_describe(tp)}",
                    key=key,
                    source=source,
                )
            return tuple(
                _convert(v, a, key=f"{key}[{i}]", source=source) for i, (v, a) in enumerate(zip(value, args))
            )
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, key=f"{key}[{i}]", source=source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"got {_kind(value)} {value!r}, expected a mapping", key=key, source=source)
        kt, vt = args if args else (Any, Any)
        return {
            _convert(k, kt, key=key, source=source): _convert(v, vt, key=_join(key, str(k)), source=source)
            for k, v in value.items()
        }
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"got {_kind(value)} {value!r}, expected {_describe(tp)}", key=key, source=source)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return f"{text} or null" if type(None) in args else text
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if origin in (tuple, list, Sequence):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", Any: "any value"}
    if tp in names:
        return names[tp]
    if dataclasses.is_dataclass(tp):
        return f"a mapping (section {tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "mapping",
    }.get(type(value), type(value).__name__)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    return obj


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, Mapping):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ValueError(f"{name}: expected > 0, got {value}")


def _non_negative(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 0:
            raise ValueError(f"{name}: expected >= 0, got {value}")
