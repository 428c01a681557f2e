"""Recipes compared over seeds: each recipe pretrained once per seed on the same data with the same
budget (``run.seed`` = the seed: the same initial weights and data order for every recipe of a seed),
evaluated on frozen features (weighted kNN and a linear probe, fitted on a labelled training set,
scored on a test split), reported as mean ± standard error over seeds and as the paired difference
per seed with a two-sided paired t-test.

    relic demo --seeds 3                 # ReLIC alpha = 0 vs the config's alpha > 0, full labels
    relic demo --semppl                  # ReLIC vs SemPPL with 10% of the labels (commands/semppl_demo.py)
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

METRICS = ("knn", "linear")


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); 0 for n = 1)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """``b - a`` per seed: mean, standard error and the two-sided paired t-test's p-value."""
    from scipy import stats

    diffs = [y - x for x, y in zip(a, b)]
    mean, se = mean_se(diffs)
    p = float(stats.ttest_rel(b, a).pvalue) if len(diffs) > 1 and se > 0 else float("nan")
    return {"diffs": diffs, "mean": mean, "se": se, "p_value": p}


def summarise(
    results: Mapping[str, Mapping[int, Mapping[str, float]]], first: str, second: str
) -> dict[str, Any]:
    """``{recipe: {seed: {metric: accuracy}}}`` -> per recipe mean/SE, and ``second - first`` paired."""
    seeds = sorted(results[first])
    out: dict[str, Any] = {"seeds": seeds, "first": first, "second": second, "recipes": {}, "difference": {}}
    for recipe in (first, second):
        out["recipes"][recipe] = {
            metric: dict(zip(("mean", "se"), mean_se([results[recipe][s][metric] for s in seeds])))
            for metric in METRICS
        }
    for metric in METRICS:
        out["difference"][metric] = paired(
            [results[first][s][metric] for s in seeds], [results[second][s][metric] for s in seeds]
        )
    return out


def report_markdown(title: str, intro: str, summary: Mapping[str, Any], labels: Mapping[str, str],
                    notes: Sequence[str] = ()) -> str:  # fmt: skip
    first, second = summary["first"], summary["second"]
    lines = [f"# {title}", "", intro, "", "| recipe | kNN | linear probe |", "|---|---|---|"]
    for recipe in (first, second):
        r = summary["recipes"][recipe]
        cells = [f"{100 * r[m]['mean']:.1f} ± {100 * r[m]['se']:.1f}" for m in METRICS]
        lines.append(f"| {labels[recipe]} | {' | '.join(cells)} |")
    d = summary["difference"]
    cells = [
        f"{100 * d[m]['mean']:+.1f} ± {100 * d[m]['se']:.1f} (p = {d[m]['p_value']:.2g})" for m in METRICS
    ]
    lines.append(f"| {labels[second]} - {labels[first]} (paired) | {' | '.join(cells)} |")
    for note in notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def pretrain(
    configs: Mapping[str, Any], seeds: Sequence[int], log: Callable[[str], None], *, worker_logs: bool = False
) -> tuple[dict[str, dict[int, Any]], dict[str, dict[int, Any]], float]:
    """Every recipe of ``configs`` once per seed (``run.name`` = recipe-seedN, ``run.seed`` = N), one
    local Ray instance; returns ``(encoders, fit results, training seconds)`` by recipe and seed."""
    from cluster.checkpoint import load_model_from_checkpoint
    from cluster.trainer import fit, ray_session

    encoders: dict[str, dict[int, Any]] = {r: {} for r in configs}
    fits: dict[str, dict[int, Any]] = {r: {} for r in configs}
    t_train = time.monotonic()
    first = next(iter(configs.values()))
    cpus = math.ceil(first.scaling.max_workers * first.scaling.cpus_per_worker)
    with ray_session(num_cpus=cpus, worker_logs=worker_logs):
        for seed in seeds:
            for recipe, cfg in configs.items():
                name = f"{recipe}-seed{seed}"
                cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name, seed=seed))
                run_dir = Path(cfg.run.storage) / name
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                t0 = time.monotonic()
                result = fit(cfg, progress=lambda line, n=name: log(f"  {n}: {line}"))
                if result.checkpoint is None:
                    raise RuntimeError(f"run {name} wrote no checkpoint ({result.run_dir})")
                encoders[recipe][seed] = load_model_from_checkpoint(result.checkpoint).encoder
                fits[recipe][seed] = result
                log(f"train {name}: done in {time.monotonic() - t0:.0f} s")
    return encoders, fits, time.monotonic() - t_train


def evaluate(
    encoders: Mapping[str, Mapping[int, Any]],
    train: tuple[Any, Any],
    test: tuple[Any, Any],
    view: Any,
    *,
    knn_k: int,
    knn_temperature: float,
    log: Callable[[str], None],
) -> dict[str, dict[int, dict[str, float]]]:
    """kNN and linear-probe accuracy of every encoder: fitted on ``train``, scored on ``test``
    (``(uint8 images, labels)``, at the view's size and normalisation)."""
    from training.evaluate import extract_features, knn_classify, linear_probe

    norm = {"mean": view.mean, "std": view.std}
    results: dict[str, dict[int, dict[str, float]]] = {r: {} for r in encoders}
    for recipe, by_seed in encoders.items():
        for seed, encoder in by_seed.items():
            train_f, _ = extract_features(encoder, train[0], **norm)
            test_f, _ = extract_features(encoder, test[0], **norm)
            results[recipe][seed] = {
                "knn": knn_classify(train_f, train[1], test_f, test[1], k=knn_k, temperature=knn_temperature),
                "linear": linear_probe(train_f, train[1], test_f, test[1]),
            }
            log(f"  {recipe} seed {seed}: kNN {100 * results[recipe][seed]['knn']:.1f}%, "
                f"linear {100 * results[recipe][seed]['linear']:.1f}%")  # fmt: skip
    return results


def write_report(report_dir: Path, metrics: Mapping[str, Any], text: str) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    (report_dir / "report.md").write_text(text)
    return report_dir / "report.md"


def run_alpha(args: argparse.Namespace) -> int:
    """``relic demo --seeds N``: ReLIC with alpha = 0 against the config's alpha > 0 over N seeds on the
    fully labelled digits (the question ``relic demo``'s single seed leaves open)."""
    import logging

    from cluster.config import ConfigError, load_config
    from commands.demo import _Clock, build_demo_shards

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    log = _Clock()
    out = Path(args.out).resolve()
    if args.seeds < 2:
        print(f"relic demo: --seeds: expected at least 2 for an error bar, got {args.seeds}", file=sys.stderr)
        return 2
    budget = [
        "run.knn_every=0",
        *([f"schedule.epochs={args.epochs}"] if args.epochs else []),
        *args.overrides,
    ]
    try:
        probe = load_config(args.config, ["data.train=unused", *budget])
    except ConfigError as e:
        print(f"relic demo: {e}", file=sys.stderr)
        return 2
    alpha = probe.objective.alpha if args.alpha is None else args.alpha
    if alpha <= 0:
        print(f"relic demo: --alpha / objective.alpha: expected > 0, got {alpha}", file=sys.stderr)
        return 2
    view = probe.views.recipe().views[0]
    log(f"relic demo --seeds {args.seeds}: alpha=0 vs alpha={alpha:g}, output {out}")
    log("[1/4] building builtin:digits shards (train/val/test)")
    urls = build_demo_shards(out, view.size, log)
    common = [f"data.train={urls['train']}", f"run.storage={out / 'seeds-runs'}", *budget]
    configs = {
        "relic_alpha0": load_config(args.config, [*common, "objective.alpha=0"]),
        "relic": load_config(args.config, [*common, f"objective.alpha={alpha}"]),
    }
    epochs = configs["relic"].schedule.epochs
    log(f"[2/4] pretraining 2 recipes x {args.seeds} seeds, {epochs} epochs each, with Ray Train")
    try:
        encoders, _, train_s = pretrain(configs, range(args.seeds), log, worker_logs=args.worker_logs)
    except RuntimeError as e:
        print(f"relic demo: {e}", file=sys.stderr)
        return 1
    log("[3/4] evaluating every encoder: kNN and linear probe fitted on the training split")
    from pipeline.labelled import load_labelled_images

    train = load_labelled_images(urls["train"], size=view.size)
    test = load_labelled_images(urls["test"], size=view.size)
    results = evaluate(encoders, train, test, view, knn_k=probe.run.knn_k,
                       knn_temperature=probe.run.knn_temperature, log=log)  # fmt: skip
    log("[4/4] writing the report")
    summary = summarise(results, "relic_alpha0", "relic")
    labels = {"relic_alpha0": "ReLIC alpha=0", "relic": f"ReLIC alpha={alpha:g}"}
    intro = (
        f"{args.seeds} seeds; {epochs} epochs per run; kNN and linear probe fitted on the {len(train[1])} "
        f"training images, accuracy in % on the {len(test[1])}-image test split (clean). Mean ± "
        "standard error over seeds; the difference is paired by seed (same initial weights, same data order)."
    )
    notes = [f"Runtime: {log.elapsed():.0f} s in all ({train_s:.0f} s training)."]
    text = report_markdown("ReLIC: alpha > 0 against alpha = 0 over seeds", intro, summary, labels, notes)
    metrics = {"summary": summary, "per_seed": results, "epochs": epochs, "train_s": train_s,
               "total_s": log.elapsed(), "config": {r: c.to_dict() for r, c in configs.items()}}  # fmt: skip
    path = write_report(out / "report-seeds", metrics, text)
    print("\n" + text, flush=True)
    print(f"report: {path}  (total {log.elapsed():.0f} s)", flush=True)
    return 0
