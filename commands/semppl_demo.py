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
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from commands.demo import DEFAULT_CONFIG, REPO_ROOT, _Clock, build_demo_shards
from commands.seeds import evaluate, mean_se, pretrain, report_markdown, summarise, write_report

SEMPPL_CONFIG = REPO_ROOT / "configs" / "demo_semppl.yaml"
RECIPES = ("relic", "semppl")


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
    try:
        encoders, fits, train_s = pretrain(configs, range(args.seeds), log, worker_logs=args.worker_logs)
    except RuntimeError as e:
        print(f"relic demo: {e}", file=sys.stderr)
        return 1
    pseudo = [
        float(accuracy[-1])
        for result in fits["semppl"].values()
        if (accuracy := [m["pseudo_label_accuracy"] for m in result.metrics if "pseudo_label_accuracy" in m])
    ]

    log("[3/4] evaluating every encoder: kNN and linear probe fitted on the labelled fraction only")
    from pipeline.labelled import load_labelled_images
    from pipeline.shards.manifest import load_manifest

    view = probe.views.recipe().views[0]
    train = load_labelled_images(partial, size=view.size, unlabelled="skip")
    test = load_labelled_images(urls["test"], size=view.size)
    results = evaluate(encoders, train, test, view, knn_k=probe.run.knn_k,
                       knn_temperature=probe.run.knn_temperature, log=log)  # fmt: skip

    log("[4/4] writing the report")
    summary = summarise(results, "relic", "semppl")
    total = load_manifest(partial).total_samples
    intro = (
        f"{len(train[1])} of {total} training images labelled ({args.label_fraction:.0%}, class-balanced); "
        f"{args.seeds} seeds; {args.epochs} epochs per run; kNN and linear probe fitted on the labelled "
        f"images only, accuracy in % on the {len(test[1])}-image test split. Mean ± standard error over "
        "seeds; the difference is paired by seed."
    )
    notes = []
    if pseudo:
        m, se = mean_se(pseudo)
        notes.append(f"SemPPL's pseudo-label accuracy on the unlabelled images (last report of each run): "
                     f"{100 * m:.1f} ± {100 * se:.1f} %.")  # fmt: skip
    notes.append(f"Runtime: {log.elapsed():.0f} s in all ({train_s:.0f} s training).")
    text = report_markdown(
        "SemPPL vs ReLIC on digits with a fraction of the labels",
        intro,
        summary,
        {"relic": "ReLIC", "semppl": "SemPPL"},
        notes,
    )
    metrics = {"summary": summary, "per_seed": results, "pseudo_label_accuracy": pseudo, "train_s": train_s,
               "total_s": log.elapsed(), "config": {r: c.to_dict() for r, c in configs.items()}}  # fmt: skip
    path = write_report(out / "report-semppl", metrics, text)
    print("\n" + text, flush=True)
    print(f"report: {path}  (total {log.elapsed():.0f} s)", flush=True)
    return 0
