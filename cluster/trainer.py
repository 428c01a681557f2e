"""Driver side of a training run: config -> Ray Train ``TorchTrainer`` -> ``FitResult``.

``fit(cfg)`` is what ``relic train`` and ``relic demo`` call. It

1. checks what can be checked before any worker starts (``preflight``: the shard manifests exist,
   every rank gets at least one batch per epoch, the kNN monitor's splits carry labels, the run storage
   takes writes — each storage check within ``run.network_timeout_s``; ``wait_for_resources``: the
   Ray cluster can hold the workers) and raises ``ConfigError`` naming the key otherwise;
2. writes the resolved config and the run's provenance (git SHA, Ray/torch versions, command line) to
   ``<run.storage>/<run.name>/`` — the experiment directory Ray Train also writes its checkpoints to;
3. builds the ``TorchTrainer``: ``ScalingConfig`` (workers, GPUs, resources, placement),
   ``RunConfig`` (name, storage path — local or remote through ``cluster.storage`` — ``FailureConfig``,
   ``CheckpointConfig``), ``TorchConfig`` (gloo/nccl), the worker function ``cluster.worker.train_loop``;
4. runs it while rank 0 sends the metrics of every report to a small actor (``_ReportSink``), and a
   controller-side callback adds each committed checkpoint and each worker failure; the driver drains
   the sink, prints one concise progress line per report and keeps the history;
5. returns where the run and its latest checkpoint are, with the metrics history.

A run whose directory already holds checkpoints (same ``run.storage`` and ``run.name``) continues from
the latest one: Ray Train V2 restores its checkpoint manager from the experiment directory, and the
workers resume from ``ray.train.get_checkpoint()`` (see ``cluster.worker``).

Ray Train V2 notes (ray 2.60, ``RAY_TRAIN_V2_ENABLED`` defaults to on): ``TorchTrainer.fit()`` starts a
controller actor on the driver's node; ``UserCallback``s run in that controller process, not in the
driver, so progress reaches the driver through a small actor (``_ReportSink``). ``Result.metrics`` only
holds the metrics attached to the latest checkpoint, which is why the history is collected here.
Metrics travel to the sink directly rather than through ``ray.train.report`` because each report
is a barrier across ranks on a synchronisation actor plus a hand-over that waits for the
controller's next poll: the workers call it at segment ends only (``cluster.worker``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.checkpoint import repair_run_snapshot
from cluster.config import ConfigError, ExperimentConfig, redact_override
from cluster.storage import RunStorage
from cluster.worker import DataOptions, WorkerSpec
from pipeline import storage as fsutil

log = logging.getLogger(__name__)

# Non-secret environment that workers need to reach the same S3-compatible endpoint as the driver.
FORWARDED_ENV = (
    "RELIC_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
)


WORKER_START_TIMEOUT_S = 600
#: Seconds between the Ray Train controller's polls of the workers (Ray's default is 2 s); see fit().
CONTROLLER_POLL_S = 0.25


@dataclass
class FitResult:
    """What a finished run left behind.

    ``run_dir``: the experiment directory (local path or ``s3://...``) holding ``config.yaml``,
    ``run_info.json``, ``metrics.jsonl``, ``tensorboard/`` and the ``checkpoint-*`` directories.
    ``checkpoint``: the latest checkpoint directory (load it with
    ``cluster.checkpoint.load_model_from_checkpoint``), None if none was written.
    ``metrics``: every report in arrival order (rank-0 view of cross-rank aggregates; after a restart
    the steps since the last checkpoint appear twice — ``metrics_by_step`` keeps the latest).
    """

    run_dir: str
    checkpoint: str | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def final_metrics(self) -> dict[str, Any] | None:
        return self.metrics[-1] if self.metrics else None

    def metrics_by_step(self) -> dict[int, dict[str, Any]]:
        return {int(m["step"]): m for m in self.metrics}


# --------------------------------------------------------------------------------------------------
# Ray connection


@contextlib.contextmanager
def ray_session(
    num_cpus: int | None = None, *, worker_logs: bool = False, **init_kwargs: Any
) -> Iterator[None]:
    """Connect to Ray for the duration of the block.

    Already connected: use it. ``RAY_ADDRESS`` set (also the case inside ``ray job submit``): join that
    cluster. Otherwise start a local instance without the dashboard UI and shut it down afterwards.

    The local instance's node IP is 127.0.0.1 and each of its servers listens on 127.0.0.1 only: the
    gRPC servers of the GCS, the raylet (node manager, object manager), the dashboard agent, the driver
    and every worker (IPv6 sockets, shown as ``::ffff:127.0.0.1``); the runtime-env agent; the dashboard
    agent's HTTP server (52365) and the Prometheus servers of the dashboard agent, the dashboard head
    (44227) and the autoscaler monitor (44217). With the host's outward IP as node IP — what Ray makes
    of ``_node_ip_address="127.0.0.1"`` unless Ray clusters are disabled — they listen on all
    interfaces instead. Not Ray's: rank 0 of a Ray Train run opens torch.distributed's ``TCPStore`` at
    ``MASTER_PORT`` on all interfaces (torch has no bind address for it); gloo's own connections are
    kept on the loopback interface (``GLOO_SOCKET_IFNAME=lo``).

    ``worker_logs``: forward the workers' and the Train controller's output to this process. Off by
    default: the driver prints its own progress lines and failures, and the full logs stay in Ray's
    session directory (``/tmp/ray/session_latest/logs``). Without a dashboard Ray Train's placement-group
    cleaner also warns every second that the State API is unavailable, which would drown the progress.
    """
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=worker_logs, **init_kwargs)
        log.info("joined the Ray cluster at %s", os.environ["RAY_ADDRESS"])
    else:
        # One machine cannot be preempted node by node: skip Ray Train's preemption-watcher actor.
        runtime_env = init_kwargs.pop("runtime_env", None) or {}
        env_vars = runtime_env.setdefault("env_vars", {})
        env_vars.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # gloo's connections bind to the address the hostname resolves to, which may be a LAN address
        env_vars.setdefault("GLOO_SOCKET_IFNAME", "lo")
        # ray.init replaces a loopback _node_ip_address by the host's outward IP
        # (services.resolve_ip_for_localhost) unless Ray clusters are disabled, and every server of the
        # instance binds according to that node IP. The switch is RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
        # which ray_constants reads once, at `import ray`: set its value for this ray.init only, so
        # that neither the import order nor a later join of a cluster depends on it.
        cluster_enabled = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                log_to_driver=worker_logs,
                runtime_env=runtime_env,
                **init_kwargs,
            )
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = cluster_enabled
        log.info(
            "started a local Ray instance on %s (%s CPUs)",
            ray.util.get_node_ip_address(),
            ray.cluster_resources().get("CPU"),
        )
    try:
        yield
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------------------------------
# Checks before any worker starts


def data_options(cfg: ExperimentConfig, url: str) -> dict[str, Any]:
    return fsutil.storage_options(url, endpoint_url=cfg.data.endpoint_url, profile=cfg.data.profile)


def with_absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with its relative local paths (training and kNN shards, run storage) made absolute
    against this process's working directory: Ray Train runs its workers in a directory of its own."""

    def absolute(path: str | None) -> str | None:
        return path if path is None or fsutil.is_remote(path) else os.path.abspath(path)

    data = dataclasses.replace(
        cfg.data,
        train=absolute(cfg.data.train),
        knn_train=absolute(cfg.data.knn_train),
        knn_val=absolute(cfg.data.knn_val),
        true_labels=absolute(cfg.data.true_labels),
    )
    return dataclasses.replace(
        cfg, data=data, run=dataclasses.replace(cfg.run, storage=absolute(cfg.run.storage))
    )


def preflight(cfg: ExperimentConfig) -> dict[str, Any]:
    """Read the manifests, probe the run storage and check the run can start; returns facts the
    driver logs.

    Raises ConfigError naming the key for: unreadable manifests, fewer samples than one batch per
    rank, kNN splits without labels, run storage that cannot be written. Each storage check ends
    within ``run.network_timeout_s``: a store that never answers is an error naming the key, the
    endpoint and the limit, not a hang.
    """
    from pipeline.shards.manifest import load_manifest

    def manifest(key: str, url: str):
        options = data_options(cfg, url)
        action = f"read the shard manifest at {_where(url, options)}"
        return _storage_check(cfg, key, action, load_manifest, url, options)

    train = manifest("data.train", cfg.data.train)
    total = sum(s.samples for s in train.shards)
    batch = cfg.data.global_batch_size
    if total < batch:
        raise ConfigError(
            f"{total} training samples cannot give one global batch of {batch}; expected at least "
            f"{batch} samples",
            key="data.global_batch_size",
        )
    facts = {"train_samples": total, "steps_per_epoch": total // batch, "labelled": bool(train.label_ext)}
    if cfg.objective.name == "semppl":
        labelled = (train.labelled or {}).get("labelled") if train.has_labels else 0
        if not train.has_labels or labelled == 0:
            raise ConfigError(
                f"SemPPL needs labels for part of the training samples, but the shards at "
                f"{cfg.data.train!r} carry none (build them with labels, e.g. `relic shards build "
                f"SOURCE OUT --label-fraction 0.1`)",
                key="objective.name",
            )
        facts["labelled_samples"] = total if labelled is None else labelled
        if cfg.data.true_labels:
            truth = manifest("data.true_labels", cfg.data.true_labels)
            if not truth.has_labels:
                raise ConfigError(
                    f"the shards at {cfg.data.true_labels!r} carry no labels", key="data.true_labels"
                )
    mask_prob = cfg.views.recipe().mask_prob
    facts["masked_samples"] = train.masks["samples"] if train.has_masks else 0
    if mask_prob > 0 and not train.has_masks:
        log.warning(
            "views.options.mask_prob is %g but the shards at %r carry no saliency masks: every view is "
            "unmasked (add masks with `relic shards masks` or `relic shards build --masks DIR`)",
            mask_prob,
            cfg.data.train,
        )
    if cfg.data.knn_val and cfg.run.knn_every:
        for key in ("data.knn_train", "data.knn_val"):
            url = getattr(cfg.data, key.split(".")[1]) or cfg.data.train
            m = train if url == cfg.data.train else manifest(key, url)
            if not m.label_ext:
                raise ConfigError(
                    f"the kNN monitor needs labels, but the shards at {url!r} have none", key=key
                )
    run_storage = RunStorage.from_url(cfg.run.storage, cfg.run.endpoint_url)
    where = _where(run_storage.url, run_storage.options)
    _storage_check(cfg, "run.storage", f"write to the run storage at {where}", run_storage.check_writable)
    return facts


def _where(url: str, options: dict[str, Any]) -> str:
    """``'url'`` and, when one is set, its endpoint: what an error about reaching ``url`` names."""
    endpoint = options.get("endpoint_url")
    return f"{url!r}" + (f" (endpoint {endpoint})" if endpoint else "")


def _storage_check(cfg: ExperimentConfig, key: str, action: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` within ``run.network_timeout_s``; any failure as a ConfigError at ``key`` that says
    what could not be done (``action``, e.g. "read the shard manifest at 's3://b/x'")."""
    limit = cfg.run.network_timeout_s
    try:
        return fsutil.call_with_deadline(limit, fn, *args)
    except fsutil.DeadlineExceeded as e:
        raise ConfigError(
            f"cannot {action}: no answer within {limit:g} s (run.network_timeout_s); check the endpoint "
            "and the network, or raise the limit for a slow store",
            key=key,
        ) from e
    except Exception as e:  # FileNotFoundError, JSON errors, S3 errors: all are the user's to fix
        raise ConfigError(f"cannot {action}: {e}", key=key) from e


#: While waiting for the cluster's resources, say what is missing this often (seconds).
RESOURCE_LOG_EVERY_S = 30.0


def worker_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What Ray reserves for each worker: its CPUs, its GPUs with ``use_gpu``, the custom resources."""
    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return resources


def wait_for_resources(cfg: ExperimentConfig) -> None:
    """Return once the connected Ray cluster can start the run's workers (an elastic run: the fewest it
    may use); ConfigError at
    ``scaling.num_workers`` naming what was asked and what the cluster has, otherwise.

    Without this, Ray Train waits for its placement group without a word, gives up after
    ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` and tries again, forever (a start timeout does not count
    against ``run.max_failures``). A Ray instance this process started cannot grow, so a request
    larger than it fails at once. A joined cluster may: nodes join, an autoscaler adds some, other jobs
    release theirs. There the same bundles are requested as a placement group (the demand an
    autoscaler scales up for) and held for at most ``scaling.resource_wait_s``, with a log line every
    ``RESOURCE_LOG_EVERY_S`` saying what is missing; the group is removed before Ray Train asks for its own.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    per_worker = {k: v for k, v in worker_resources(cfg).items() if v > 0}
    # an elastic run starts with what is there, from its smallest allowed size on
    num_workers, strategy = min(cfg.world_sizes), cfg.scaling.placement_strategy
    need = {k: v * num_workers for k, v in per_worker.items()}

    def requested(resources: dict[str, float]) -> str:
        return _amounts({k: resources.get(k, 0.0) for k in per_worker})

    def shortfall() -> str:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        have = {k: sum(n["Resources"].get(k, 0.0) for n in nodes) for k in per_worker}
        listed = "; ".join(f"{n['NodeManagerAddress']} {requested(n['Resources'])}" for n in nodes[:8])
        return (
            f"{num_workers} workers x {_amounts(per_worker)} ({strategy}) need {_amounts(need)}, but the Ray "
            f"cluster has {_amounts(have)} ({requested(ray.available_resources())} free) on "
            f"{len(nodes)} node(s): {listed}"
        )

    totals = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    placeable = _placeable(per_worker, num_workers, strategy, totals)
    free = ray.available_resources()
    if placeable and all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items()):
        return
    fix = "lower scaling.num_workers or the per-worker resources (scaling.cpus_per_worker, ...)"
    if strategy.startswith("STRICT"):
        fix += f", or relax scaling.placement_strategy={strategy}"
    if not placeable and _started_by_this_process():
        raise ConfigError(
            f"{shortfall()}; a Ray instance started by this process cannot grow: {fix}",
            key="scaling.num_workers",
        )
    limit = cfg.scaling.resource_wait_s
    if limit == 0:
        raise ConfigError(
            f"{shortfall()}; not waiting (scaling.resource_wait_s=0): {fix}", key="scaling.num_workers"
        )
    waiting_for = "nodes to join" if not placeable else "other work to release them"
    deadline = time.monotonic() + limit
    group = placement_group([per_worker] * num_workers, strategy=strategy)
    try:
        # resources a run has just released take a moment to show as free: no warning for that
        ready = group.wait(min(2.0, limit))
        while not ready:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConfigError(
                    f"{shortfall()}; waited {limit:g} s (scaling.resource_wait_s) for {waiting_for}: "
                    f"{fix}, add nodes, or wait longer",
                    key="scaling.num_workers",
                )
            log.warning(
                "waiting up to %.0f s (scaling.resource_wait_s) for %s: %s", left, waiting_for, shortfall()
            )
            ready = group.wait(min(RESOURCE_LOG_EVERY_S, left))
    finally:
        remove_placement_group(group)


def _placeable(
    per_worker: dict[str, float], num_workers: int, strategy: str, nodes: list[dict[str, float]]
) -> bool:
    """Whether ``num_workers`` bundles of ``per_worker`` fit on nodes of these total resources under a
    Ray placement strategy (PACK and SPREAD are preferences; STRICT_PACK: one node, STRICT_SPREAD:
    one node each)."""
    fits = [min(int(node.get(k, 0.0) / v + 1e-9) for k, v in per_worker.items()) for node in nodes]
    if strategy == "STRICT_PACK":
        return max(fits, default=0) >= num_workers
    if strategy == "STRICT_SPREAD":
        return sum(f > 0 for f in fits) >= num_workers
    return sum(fits) >= num_workers


def _amounts(resources: dict[str, float]) -> str:
    """``"8 CPU, 1 GPU"``."""
    return ", ".join(f"{v:g} {k}" for k, v in resources.items())


def _started_by_this_process() -> bool:
    """Whether ``ray.init`` in this process started the Ray instance rather than joining one. Ray has
    no public API for it; its head ``Node`` object, which only the starting process holds, says so."""
    from ray._private import worker

    node = worker._global_node
    return node is not None and node.head


# --------------------------------------------------------------------------------------------------
# Provenance


def git_sha(path: str | os.PathLike | None = None) -> str:
    """HEAD of the repository holding ``path`` (default: this package), "+dirty" when modified;
    ``RELIC_GIT_SHA`` when not in a repository (e.g. a Docker image or a Ray job's working_dir copy)."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{sha}+dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("RELIC_GIT_SHA", "unknown")


def run_info(cfg: ExperimentConfig) -> dict[str, Any]:
    import ray
    import torch

    return {
        "git_sha": git_sha(),
        "command": shlex.join(redact_override(a) for a in sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "ray": ray.__version__,
        "torch": torch.__version__,
        "num_workers": cfg.scaling.num_workers,
        "partitions": cfg.partitions,
    }


# --------------------------------------------------------------------------------------------------
# Reports from the workers to the driver


def _sink_class():
    import ray

    @ray.remote(num_cpus=0)
    class _ReportSink:
        """Holds reports pushed by the controller-side callback until the driver drains them."""

        def __init__(self) -> None:
            self.items: list[dict[str, Any]] = []

        def push(self, item: dict[str, Any]) -> None:
            self.items.append(item)

        def drain(self) -> list[dict[str, Any]]:
            out, self.items = self.items, []
            return out

    return _ReportSink


def _callback_class():
    from ray.train import UserCallback

    class _ForwardReports(UserCallback):
        """Runs in the Ray Train controller: forwards each committed checkpoint and each worker
        failure to the sink (the metrics reach it from rank 0 directly, ``RaySession.report``)."""

        def __init__(self, sink) -> None:
            self.sink = sink

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if checkpoint is not None:
                step = metrics[0].get("step") if metrics else None
                # fire and forget: never block the controller's event loop
                self.sink.push.remote({"kind": "checkpoint", "step": step, "path": checkpoint.path})

        def after_exception(self, run_context, worker_exceptions) -> None:
            errors = {int(rank): f"{type(e).__name__}: {e}"[:2000] for rank, e in worker_exceptions.items()}
            self.sink.push.remote({"kind": "failure", "errors": errors})

    return _ForwardReports


def progress_line(m: dict[str, Any]) -> str:
    """One concise line per report, e.g.
    ``step 120/800 ep 1 loss 4.213 (c 4.101 i 0.112) lr 0.0500 m 0.9961 1234 img/s wait 3%``."""
    total = m.get("total_steps")
    parts = [f"step {m.get('step')}" + (f"/{total}" if total else ""), f"ep {m.get('epoch')}"]
    if "world_size" in m:
        parts.append(f"w{m['world_size']}")
    if "loss" in m:
        semantic = f" s {m['semantic']:.4f}" if "semantic" in m else ""
        parts.append(
            f"loss {m['loss']:.4f} (c {m.get('contrastive', float('nan')):.4f}{semantic} "
            f"i {m.get('invariance', float('nan')):.4f})"
        )
    if "lr" in m:
        parts.append(f"lr {m['lr']:.4g} m {m.get('momentum', float('nan')):.5f}")
    if "images_per_s" in m:
        parts.append(f"{m['images_per_s']:.0f} img/s wait {100 * m.get('data_wait_fraction', 0.0):.0f}%")
    skipped = m.get("skipped_total")
    if skipped:
        parts.append(f"skipped {skipped}")
    unmasked = m.get("unmasked", 0) + m.get("bad_mask", 0)
    if unmasked:
        parts.append(f"unmasked {unmasked}")
    if "knn_accuracy" in m:
        parts.append(f"kNN {100 * m['knn_accuracy']:.1f}%")
    if "pseudo_label_accuracy" in m:
        parts.append(f"pseudo {100 * m['pseudo_label_accuracy']:.0f}%")
    if m.get("checkpoint"):
        parts.append("[ckpt]")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------------
# fit


def worker_spec(
    cfg: ExperimentConfig,
    storage: RunStorage,
    *,
    hooks: Sequence[Any] = (),
    sha: str | None = None,
    sink: Any = None,
) -> WorkerSpec:
    """What every worker receives (``cluster.worker.train_loop``). Storage options are resolved here,
    on the driver, so that workers see the endpoints the user configured. ``sink``: the actor that
    carries rank 0's metrics to the driver (``fit``)."""
    return WorkerSpec(
        config=cfg,
        run_dir=storage.run_url(cfg.run.name),
        run_storage_options=storage.options,
        data_options=DataOptions(
            train=data_options(cfg, cfg.data.train),
            knn_train=data_options(cfg, cfg.data.knn_train or cfg.data.train),
            knn_val=data_options(cfg, cfg.data.knn_val) if cfg.data.knn_val else {},
            true_labels=data_options(cfg, cfg.data.true_labels) if cfg.data.true_labels else {},
        ),
        git_sha=sha or git_sha(),
        hooks=list(hooks),
        sink=sink,
    )


def build_trainer(
    cfg: ExperimentConfig,
    *,
    run_storage: RunStorage,
    spec: WorkerSpec,
    callbacks: Sequence[Any] = (),
    worker_env: dict[str, str] | None = None,
):
    """The ``TorchTrainer`` for ``cfg`` (not started)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.worker import train_loop

    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env.update(cfg.scaling.env_vars)
    env.update(worker_env or {})
    storage_path, storage_fs = run_storage.ray_storage()
    return TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend=cfg.scaling.torch_backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=worker_resources(cfg),
            placement_strategy=cfg.scaling.placement_strategy,
            elastic_resize_monitor_interval_s=cfg.scaling.resize_check_s,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
            callbacks=list(callbacks),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )


def fit(
    cfg: ExperimentConfig,
    *,
    progress: bool | Callable[[str], None] = True,
    worker_env: dict[str, str] | None = None,
    hooks: Sequence[Any] = (),
    poll_interval: float = 0.5,
) -> FitResult:
    """Train ``cfg`` with Ray Train on the connected Ray cluster (see ``ray_session``).

    ``progress``: True prints a line per report to stdout, a callable receives each line, False is
    silent. ``worker_env``: extra environment for the workers (e.g. credentials of a test endpoint;
    the endpoint variables in ``FORWARDED_ENV`` are forwarded automatically). ``hooks``: picklable
    objects whose ``on_step(info)`` runs on every worker after every step (``cluster.worker.StepInfo``;
    for fault-injection drills and tests).

    Raises ConfigError before any worker starts, ``ray.train.TrainingFailedError`` when the run fails
    for good (after ``run.max_failures`` restarts).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        raise RuntimeError("fit() needs a Ray connection: wrap it in cluster.trainer.ray_session()")
    emit = progress if callable(progress) else (print if progress else (lambda _line: None))
    cfg = with_absolute_paths(cfg)
    facts = preflight(cfg)
    wait_for_resources(cfg)
    # Ray Train gives a worker group 60 s to start, then counts a failure. Starting workers that import
    # torch and DALI on a busy CPU node can take longer; Ray propagates this variable from the driver.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(WORKER_START_TIMEOUT_S))
    # A worker's ray.train.report blocks while its previous report is still unread (a queue of one),
    # and the controller reads reports when it polls the workers, every 2 s by default: reporting
    # faster than that stalls training. Poll every CONTROLLER_POLL_S unless the user chose otherwise.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(CONTROLLER_POLL_S))
    storage = RunStorage.from_url(cfg.run.storage, cfg.run.endpoint_url)
    run_dir = storage.run_url(cfg.run.name)
    repair_run_snapshot(run_dir, storage.options)  # drop missing or damaged checkpoints Ray would resume from
    resuming = storage.exists(storage.run_url(cfg.run.name, "config.yaml"))
    info = {**run_info(cfg), **facts}
    storage.write_text(storage.run_url(cfg.run.name, "config.yaml"), cfg.to_yaml())
    storage.write_text(storage.run_url(cfg.run.name, "run_info.json"), json.dumps(info, indent=2) + "\n")
    log.info(
        "run %s in %s (git %s)%s", cfg.run.name, run_dir, info["git_sha"], " — resuming" if resuming else ""
    )

    # on the driver's node, which the run cannot lose: a sink on a lost node would drop every report after
    sink = (
        _sink_class()
        .options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(
                node_id=ray.get_runtime_context().get_node_id(), soft=False
            )
        )
        .remote()
    )
    spec = worker_spec(cfg, storage, hooks=hooks, sha=info["git_sha"], sink=sink)
    trainer = build_trainer(
        cfg,
        run_storage=storage,
        spec=spec,
        callbacks=[_callback_class()(sink)],
        worker_env=worker_env,
    )

    history: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    restored = {"step": -1}
    unclaimed: dict[int, str] = {}  # checkpoints whose step's metrics have not arrived yet

    def drain() -> None:
        for item in ray.get(sink.drain.remote(), timeout=60):
            if item["kind"] == "report":
                m = dict(item["metrics"])
                if m.get("restored_step", -1) != restored["step"]:
                    restored["step"] = m["restored_step"]
                    emit(f"resumed from the checkpoint at step {m['restored_step']}")
                if m.get("world_size") != restored.get("world_size"):
                    if restored.get("world_size") is not None:
                        emit(f"worker group resized: {restored['world_size']} -> {m['world_size']} workers")
                    restored["world_size"] = m.get("world_size")
                if m.get("step") in unclaimed:
                    m["checkpoint"] = unclaimed.pop(m["step"])
                history.append(m)
                emit(progress_line(m))
            elif item["kind"] == "checkpoint":
                url = _as_url(storage, item["path"])
                # Rank 0 sends a step's metrics before it reports the checkpoint to Ray, so they are
                # almost always here already; the two travel by different callers, though.
                for m in reversed(history):
                    if m.get("step") == item["step"]:
                        m["checkpoint"] = url
                        break
                else:
                    unclaimed[item["step"]] = url
                emit(f"checkpoint at step {item['step']}: {url}")
            else:
                failures.append(item["errors"])
                for rank, err in sorted(item["errors"].items()):
                    emit(f"worker rank {rank} failed: {err.splitlines()[0] if err else err}")
                emit(
                    "Ray Train restarts the worker group from the last checkpoint (run.max_failures permitting)"
                )

    # trainer.fit() stays in this thread: Ray installs its Ctrl-C handler (abort the controller) only
    # from the main thread. The reports are drained by a helper thread meanwhile.
    stop = threading.Event()

    def pump() -> None:
        while not stop.wait(poll_interval):
            try:
                drain()
            except Exception as e:  # a hiccup of the sink must not kill the run; the final drain retries
                log.debug("report drain failed: %s", e)

    pump_thread = threading.Thread(target=pump, name="relic-progress", daemon=True)
    pump_thread.start()
    try:
        from cluster.elastic import divisible_sizes  # imports Ray Train's internals

        with divisible_sizes(cfg.world_sizes):
            result = trainer.fit()
    finally:
        stop.set()
        pump_thread.join(timeout=120)
        with contextlib.suppress(Exception):
            drain()
        with contextlib.suppress(Exception):
            ray.kill(sink)
        _write_history(storage, cfg, history)
    checkpoint = _as_url(storage, result.checkpoint.path) if result.checkpoint else None
    return FitResult(
        run_dir=run_dir,
        checkpoint=checkpoint,
        metrics=history,
        failures=failures,
        storage_options=storage.options,
    )


def _as_url(storage: RunStorage, fs_path: str) -> str:
    """Ray reports paths inside its filesystem ("bucket/prefix/..." for s3); give them their scheme back."""
    if storage.is_remote and "://" not in fs_path:
        return f"{fsutil.protocol(storage.url)}://{fs_path}"
    return fs_path


def _write_history(storage: RunStorage, cfg: ExperimentConfig, history: list[dict[str, Any]]) -> None:
    """Merge this fit's reports into ``<run_dir>/metrics.jsonl``: one line per step, in step order; a
    step trained again after a restart or a resume keeps its latest report."""
    if not history:
        return
    url = storage.run_url(cfg.run.name, "metrics.jsonl")
    try:
        previous = storage.read_text(url).splitlines() if storage.exists(url) else []
        by_step = {int(m["step"]): m for m in [*map(json.loads, previous), *history]}
        text = "".join(json.dumps(by_step[s], sort_keys=True) + "\n" for s in sorted(by_step))
        storage.write_text(url, text)
    except Exception as e:  # the run itself succeeded or failed already; do not mask that
        log.warning("could not write metrics.jsonl: %s", e)
