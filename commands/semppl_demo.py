"""``relic demo --semppl``: SemPPL against ReLIC on digits with a fraction of the labels, over seeds.

    relic demo --semppl                        # 10% of the labels, 3 seeds, 30 epochs per run
    relic demo --semppl --seeds 5 --label-fraction 0.1 --epochs 30

What it does, printing progress all the way:

1. builds ``builtin:digits`` shards (train/val/test, as ``relic demo`` does) and a partly labelled
   copy of the training split, ``--label-fraction`` of its labels kept class-balanced
   (``relic shards build --label-fraction F --seed 0``): the only labels any run or evaluation sees;
2. for each seed, pretrains ReLIC (``configs/demo.yaml``) and SemPPL (``configs/demo_semppl.yaml``)
   on that partly labelled split with the same budget (epochs, batch, views, optimiser, data order;
   ``run.seed`` = the seed), through ``cluster.trainer.fit`` on a local Ray instance. SemPPL's monitor
   compares its pseudo-labels with the true labels of the fully labelled split
   (``data.true_labels``), which the objective never sees;
3. evaluates every encoder on frozen features: weighted kNN and a linear probe fitted on the
   labelled fraction only, scored on the clean test split;
4. writes ``<out>/report-semppl/{metrics.json, report.md}``: per recipe the mean and standard error
   over seeds, and the paired difference SemPPL - ReLIC per seed with its mean, standard error and a
   two-sided paired t-test (the seeds are paired: same seed, same initial weights, same data order).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from commands.demo import DEFAULT_CONFIG, REPO_ROOT, _Clock, build_demo_shards

SEMPPL_CONFIG = REPO_ROOT / "configs" / "demo_semppl.yaml"
RECIPES = ("relic", "semppl")
METRICS = ("knn", "linear")


def build_partly_labelled(
    out: Path, full_train: str, fraction: float, image_size: int, log: Callable[[str], None]
) -> str:
    """The training split with ``fraction`` of its labels (class-balanced, seed 0) under
    ``out/shards/train-labelled-<percent>``; reused when it exists with the same source and fraction."""
    from pipeline.shards.build import build_shards
    from pipeline.shards.manifest import load_manifest

    target = out / "shards" / f"train-labelled-{fraction * 100:g}pct"
    source = f"builtin:digits?split=train&size={image_size}"
    try:
        manifest = load_manifest(str(target))
        if manifest.source == source and (manifest.labelled or {}).get("fraction") == fraction:
            log(f"shards: reusing {target} ({manifest.labelled['labelled']} labelled)")
            return str(target)
    except (FileNotFoundError, OSError, ValueError):
        pass
    if target.exists():
        shutil.rmtree(target)
    manifest = build_shards(
        source, str(target), max_samples=512, index=True, label_fraction=fraction, seed=0, progress=False
    )
    full = load_manifest(full_train)
    if [s.samples for s in full.shards] != [s.samples for s in manifest.shards]:
        raise RuntimeError(f"{target}: not the same samples as {full_train}")
    log(
        f"shards: built {target} — {manifest.labelled['labelled']} of {manifest.total_samples} images "
        f"labelled ({fraction:.0%}, class-balanced)"
    )
    return str(target)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); 0 for n = 1)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """``b - a`` per seed: mean, standard error and the two-sided paired t-test's p-value."""
    from scipy import stats

    diffs = [y - x for x, y in zip(a, b)]
    mean, se = mean_se(diffs)
    p = float(stats.ttest_rel(b, a).pvalue) if len(diffs) > 1 and se > 0 else float("nan")
    return {"diffs": diffs, "mean": mean, "se": se, "p_value": p}


def summarise(results: Mapping[str, Mapping[int, Mapping[str, float]]]) -> dict[str, Any]:
    """``{recipe: {seed: {metric: accuracy}}}`` -> per recipe mean/SE and the paired difference."""
    seeds = sorted(results["relic"])
    out: dict[str, Any] = {"seeds": seeds, "recipes": {}, "semppl_minus_relic": {}}
    for recipe in RECIPES:
        out["recipes"][recipe] = {
            metric: dict(zip(("mean", "se"), mean_se([results[recipe][s][metric] for s in seeds])))
            for metric in METRICS
        }
    for metric in METRICS:
        out["semppl_minus_relic"][metric] = paired(
            [results["relic"][s][metric] for s in seeds], [results["semppl"][s][metric] for s in seeds]
        )
    return out


def report_markdown(summary: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    seeds = summary["seeds"]
    lines = [
        "# SemPPL vs ReLIC on digits with a fraction of the labels",
        "",
        f"{meta['labelled']} of {meta['train']} training images labelled ({meta['fraction']:.0%}, "
        f"class-balanced); {len(seeds)} seeds; {meta['epochs']} epochs per run; kNN and linear probe "
        f"fitted on the labelled images only, accuracy in % on the {meta['test']}-image test split. "
        "Mean ± standard error over seeds; the difference is paired by seed.",
        "",
        "| recipe | kNN | linear probe |",
        "|---|---|---|",
    ]
    for recipe in RECIPES:
        r = summary["recipes"][recipe]
        cells = [f"{100 * r[m]['mean']:.1f} ± {100 * r[m]['se']:.1f}" for m in METRICS]
        lines.append(f"| {recipe} | {' | '.join(cells)} |")
    d = summary["semppl_minus_relic"]
    cells = [
        f"{100 * d[m]['mean']:+.1f} ± {100 * d[m]['se']:.1f} (p = {d[m]['p_value']:.2g})" for m in METRICS
    ]
    lines.append(f"| SemPPL - ReLIC | {' | '.join(cells)} |")
    if meta.get("pseudo_label_accuracy"):
        accs = meta["pseudo_label_accuracy"]
        m, se = mean_se(accs)
        lines += ["", f"SemPPL's pseudo-label accuracy on the unlabelled images (last report of each run): "
                  f"{100 * m:.1f} ± {100 * se:.1f} %."]  # fmt: skip
    lines += ["", f"Runtime: {meta['total_s']:.0f} s in all ({meta['train_s']:.0f} s training)."]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    log = _Clock()
    out = Path(args.out).resolve()
    from cluster.config import ConfigError, load_config

    if not 0 < args.label_fraction <= 1:
        print(
            f"relic demo: --label-fraction: expected a value in (0, 1], got {args.label_fraction}",
            file=sys.stderr,
        )
        return 2
    if args.seeds < 2:
        print(f"relic demo: --seeds: expected at least 2 for an error bar, got {args.seeds}", file=sys.stderr)
        return 2
    budget = [f"schedule.epochs={args.epochs}", "run.knn_every=0", *args.overrides]
    try:
        probe = load_config(DEFAULT_CONFIG, ["data.train=unused", *budget])
    except ConfigError as e:
        print(f"relic demo: {e}", file=sys.stderr)
        return 2
    image_size = probe.views.recipe().views[0].size
    log(f"relic demo --semppl: {args.seeds} seeds, {args.label_fraction:.0%} of the labels, output {out}")

    log("[1/4] building builtin:digits shards and the partly labelled training split")
    urls = build_demo_shards(out, image_size, log)
    partial = build_partly_labelled(out, urls["train"], args.label_fraction, image_size, log)

    common = [f"data.train={partial}", f"run.storage={out / 'semppl-runs'}", *budget]
    try:
        configs = {
            "relic": load_config(DEFAULT_CONFIG, common),
            "semppl": load_config(SEMPPL_CONFIG, [*common, f"data.true_labels={urls['train']}"]),
        }
    except ConfigError as e:
        print(f"relic demo: {e}", file=sys.stderr)
        return 2

    log(f"[2/4] pretraining {len(RECIPES)} recipes x {args.seeds} seeds with Ray Train (same budget)")
    from cluster.checkpoint import load_model_from_checkpoint
    from cluster.trainer import fit, ray_session

    encoders: dict[str, dict[int, Any]] = {r: {} for r in RECIPES}
    pseudo: list[float] = []
    t_train = time.monotonic()
    cpus = math.ceil(probe.scaling.max_workers * probe.scaling.cpus_per_worker)
    with ray_session(num_cpus=cpus, worker_logs=args.worker_logs):
        for seed in range(args.seeds):
            for recipe in RECIPES:
                cfg = configs[recipe]
                name = f"{recipe}-seed{seed}"
                cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name, seed=seed))
                run_dir = Path(cfg.run.storage) / name
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                t0 = time.monotonic()
                result = fit(cfg, progress=lambda line, n=name: log(f"  {n}: {line}"))
                if result.checkpoint is None:
                    print(f"relic demo: run {name} wrote no checkpoint ({result.run_dir})", file=sys.stderr)
                    return 1
                encoders[recipe][seed] = load_model_from_checkpoint(result.checkpoint).encoder
                accuracy = [
                    m["pseudo_label_accuracy"] for m in result.metrics if "pseudo_label_accuracy" in m
                ]
                if recipe == "semppl" and accuracy:
                    pseudo.append(float(accuracy[-1]))
                log(f"train {name}: done in {time.monotonic() - t0:.0f} s")
    train_s = time.monotonic() - t_train

    log("[3/4] evaluating every encoder: kNN and linear probe fitted on the labelled fraction only")
    from pipeline.labelled import load_labelled_images
    from pipeline.shards.manifest import load_manifest
    from training.evaluate import extract_features, knn_classify, linear_probe

    view = probe.views.recipe().views[0]
    train_x, train_y = load_labelled_images(partial, size=view.size, unlabelled="skip")
    test_x, test_y = load_labelled_images(urls["test"], size=view.size)
    norm = {"mean": view.mean, "std": view.std}
    results: dict[str, dict[int, dict[str, float]]] = {r: {} for r in RECIPES}
    for recipe in RECIPES:
        for seed, encoder in encoders[recipe].items():
            train_f, _ = extract_features(encoder, train_x, **norm)
            test_f, _ = extract_features(encoder, test_x, **norm)
            results[recipe][seed] = {
                "knn": knn_classify(
                    train_f, train_y, test_f, test_y, k=probe.run.knn_k, temperature=probe.run.knn_temperature
                ),
                "linear": linear_probe(train_f, train_y, test_f, test_y),
            }
            log(
                f"  {recipe} seed {seed}: kNN {100 * results[recipe][seed]['knn']:.1f}%, "
                f"linear {100 * results[recipe][seed]['linear']:.1f}%"
            )

    log("[4/4] writing the report")
    summary = summarise(results)
    meta = {
        "fraction": args.label_fraction,
        "labelled": len(train_y),
        "train": load_manifest(partial).total_samples,
        "test": len(test_y),
        "epochs": args.epochs,
        "train_s": train_s,
        "total_s": log.elapsed(),
        "pseudo_label_accuracy": pseudo,
    }
    report_dir = out / "report-semppl"
    report_dir.mkdir(parents=True, exist_ok=True)
    metrics = {
        "summary": summary,
        "per_seed": results,
        "meta": meta,
        "config": {r: c.to_dict() for r, c in configs.items()},
    }
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    text = report_markdown(summary, meta)
    (report_dir / "report.md").write_text(text)
    print("\n" + text, flush=True)
    print(f"report: {report_dir / 'report.md'}  (total {log.elapsed():.0f} s)", flush=True)
    return 0
