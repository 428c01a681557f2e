"""``relic eval``: evaluate a pretrained encoder on labelled shards, and export it for torchvision.

    relic eval runs/demo/relic-alpha1 --train runs/demo/shards/train --test runs/demo/shards/test
    relic eval s3://bucket/runs/r50/checkpoint_000100 --train s3://bucket/imagenet/train \\
        --test s3://bucket/imagenet/val --max-train 50000 --size 224 --no-robustness \\
        --export out/r50 --json out/r50/eval.json

CHECKPOINT is a checkpoint directory written by ``relic train`` (or a run directory: its latest
checkpoint is used) or a ``.pt`` file holding a ``TrainState``/model state dict. The weighted kNN and
the linear probe are fitted on frozen features of ``--train`` and scored on ``--test``, clean and under
every corruption of ``training.evaluate.CORRUPTIONS`` at severities 1..5 (``--corruptions`` to choose).
Images are decoded from the shards with PIL, resized (shorter side) and centre-cropped to ``--size``
(default: the training views' size) and normalised with the training recipe's mean/std.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.labelled import load_labelled_images


def log_line(message: str) -> None:
    """Progress on stderr, so that stdout carries only the results table."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="checkpoint directory or run directory (its latest checkpoint), local or s3://"
    )
    parser.add_argument(
        "--train", required=True, help="labelled shards the probes are fitted on (kNN memory bank)"
    )
    parser.add_argument("--test", required=True, help="labelled shards the probes are scored on")
    parser.add_argument(
        "--size", type=int, default=None, help="image side (default: the training views' size)"
    )
    parser.add_argument("--max-train", type=int, default=None, help="use at most N training images")
    parser.add_argument("--max-test", type=int, default=None, help="use at most N test images")
    parser.add_argument("--knn-k", type=int, default=20, help="neighbours of the weighted kNN (DINO: 20)")
    parser.add_argument(
        "--knn-temperature", type=float, default=0.07, help="kNN vote temperature (DINO: 0.07)"
    )
    parser.add_argument("--l2", type=float, default=1e-4, help="L2 strength of the linear probe")
    parser.add_argument(
        "--corruptions",
        default=None,
        help="comma-separated corruptions (default: all of training.evaluate.CORRUPTIONS); 'none' to skip",
    )
    parser.add_argument("--severities", default="1,2,3,4,5", help="comma-separated severities (default 1..5)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device for the encoder (cpu, cuda, cuda:1)")
    parser.add_argument(
        "--export",
        metavar="DIR",
        default=None,
        help="write encoder.pt (torchvision), projector.pt, export.json",
    )
    parser.add_argument(
        "--export-head",
        choices=("zeros", "probe"),
        default="zeros",
        help="fc of the exported encoder: zero 1000-way head (loads into torchvision.models.<arch>()) "
        "or the fitted linear probe (loads into <arch>(num_classes=C))",
    )
    parser.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// URLs")


def _options(url: str, endpoint: str | None) -> dict[str, Any]:
    return storage.storage_options(url, endpoint_url=endpoint)


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--{what}: expected comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from cluster.checkpoint import load_model_from_checkpoint
    from training import evaluate as ev

    t0 = time.monotonic()
    try:
        corruptions = (
            list(ev.CORRUPTIONS)
            if args.corruptions is None
            else [c for c in args.corruptions.split(",") if c.strip() and c != "none"]
        )
        unknown = [c for c in corruptions if c not in ev.CORRUPTIONS]
        if unknown:
            raise ValueError(
                f"--corruptions: unknown {unknown}; expected some of {', '.join(ev.CORRUPTIONS)}"
            )
        severities = _ints(args.severities, "severities")
        bad = [s for s in severities if s not in ev.SEVERITIES]
        if bad:
            raise ValueError(f"--severities: expected values in 1..5, got {bad}")
    except ValueError as e:
        print(f"relic eval: {e}", file=sys.stderr)
        return 2
    try:
        loaded = load_model_from_checkpoint(
            args.checkpoint, storage_options=_options(args.checkpoint, args.endpoint_url), device=args.device
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"relic eval: {e}", file=sys.stderr)
        return 2
    cfg = loaded.config
    view = cfg.views.recipe().views[0]
    size = args.size or view.size
    log_line(
        f"relic eval: {loaded.path} (step {loaded.step}, epoch {loaded.epoch}, {cfg.model.arch}), images {size}px"
    )
    try:
        train_x, train_y = load_labelled_images(
            args.train,
            size=size,
            max_samples=args.max_train,
            storage_options=_options(args.train, args.endpoint_url),
        )
        test_x, test_y = load_labelled_images(
            args.test,
            size=size,
            max_samples=args.max_test,
            storage_options=_options(args.test, args.endpoint_url),
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"relic eval: {e}", file=sys.stderr)
        return 2
    log_line(f"relic eval: {len(train_y)} training and {len(test_y)} test images decoded")
    result = ev.evaluate_encoder(
        loaded.encoder,
        train_x,
        train_y,
        test_x,
        test_y,
        mean=view.mean,
        std=view.std,
        knn_k=args.knn_k,
        knn_temperature=args.knn_temperature,
        probe_l2=args.l2,
        corruptions=corruptions,
        severities=severities,
        device=args.device,
        batch_size=args.batch_size,
        log=lambda m: log_line(f"relic eval: {m}"),
    )
    summary = {"checkpoint": loaded.path, "step": loaded.step, "epoch": loaded.epoch, **result.to_dict()}
    print(f"{'probe':<8} {'clean':>7} {'corrupted':>10}")
    for probe in ("knn", "linear"):
        corrupted = result.corrupted_mean(probe)
        print(
            f"{probe:<8} {100 * getattr(result, probe):>6.1f}% {'-' if corrupted != corrupted else f'{100 * corrupted:.1f}%':>10}"
        )
    if args.export:
        probe = None
        if args.export_head == "probe":
            feats, _ = ev.extract_features(
                loaded.encoder,
                train_x,
                device=args.device,
                batch_size=args.batch_size,
                mean=view.mean,
                std=view.std,
            )
            probe = ev.fit_linear_probe(feats, train_y, l2=args.l2)
        paths = ev.export_encoder(
            loaded.model,
            args.export,
            arch=cfg.model.arch,
            small_stem=cfg.model.small_stem,
            width=cfg.model.width,
            probe=probe,
            extra={
                "checkpoint": loaded.path,
                "step": loaded.step,
                "mean": list(view.mean),
                "std": list(view.std),
                "image_size": size,
            },
        )
        summary["export"] = paths
        print(
            f"exported: {paths['encoder']} (torchvision {cfg.model.arch}"
            + (f" width {cfg.model.width:g}" if cfg.model.width != 1 else "")
            + f", strict=True), {paths.get('projector')}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"results: {args.json}")
    log_line(f"relic eval: done in {time.monotonic() - t0:.0f} s")
    return 0
