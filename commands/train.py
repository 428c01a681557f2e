"""``relic train CONFIG [key=value ...]``: pretrain ReLIC with Ray Train.

On one machine (starts a local Ray instance on 127.0.0.1 with CPU workers)::

    relic train configs/demo.yaml
    relic train configs/demo.yaml schedule.epochs=5 scaling.num_workers=2 run.name=try2

On a Ray cluster (joins it: ``RAY_ADDRESS`` is set by ``ray job submit``, or export it yourself)::

    ray job submit --address http://head:8265 --working-dir . -- \\
        relic train configs/imagenet_r50_relic.yaml data.train=s3://bucket/imagenet/train

The config is loaded and validated, and the shard manifests are checked, before any worker starts;
a mistake exits with status 2 and a message naming the key. The git SHA and the resolved config are
logged at start and stored in the run directory (``<run.storage>/<run.name>/``). Running again with
the same ``run.name`` continues from the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cluster.config import ConfigError, describe_recipe, load_config

log = logging.getLogger("relic.train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML experiment config (see configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. optim.base_lr=0.3 run.name=x",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit without training"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-report progress lines")
    parser.add_argument(
        "--worker-logs", action="store_true", help="forward the Ray workers' own output to this terminal"
    )


def ray_train_errors() -> tuple[type[BaseException], ...]:
    from ray.train import TrainingFailedError

    return (TrainingFailedError,)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"relic train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml() + describe_recipe(cfg.views.recipe()), end="")
        return 0

    from cluster.trainer import fit, git_sha, preflight, ray_session

    try:
        preflight(cfg)
    except ConfigError as e:
        print(f"relic train: {e}", file=sys.stderr)
        return 2
    print(f"relic train: git {git_sha()}", flush=True)
    print("relic train: resolved config:\n" + cfg.to_yaml(), flush=True)
    with ray_session(worker_logs=args.worker_logs):
        try:
            result = fit(cfg, progress=(lambda line: print(line, flush=True)) if not args.quiet else False)
        except ConfigError as e:
            print(f"relic train: {e}", file=sys.stderr)
            return 2
        except ray_train_errors() as e:
            print(f"relic train: training failed for good: {e}", file=sys.stderr)
            return 1
    final = result.final_metrics
    where = f"run {result.run_dir}, latest checkpoint {result.checkpoint}"
    if final is None:
        print(f"relic train: nothing left to train (the run had reached its last step) — {where}", flush=True)
    else:
        print(f"relic train: done at step {final['step']} — {where}", flush=True)
    return 0
