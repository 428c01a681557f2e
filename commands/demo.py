"""``relic demo``: the whole system on one machine, with an evaluation report.

    make demo                      # = relic demo (from a fresh clone: creates .venv first)
    relic demo --out runs/demo     # the same, explicitly
    relic demo --quick             # a reduced run (a few steps, evaluation on subsets) in about a minute
    relic demo schedule.epochs=5   # config overrides apply to both trained encoders

What it does, printing progress all the way:

1. builds ``builtin:digits`` shards — train, validation and test splits (stratified 70/10/20, fixed
   seed; ``pipeline.shards.sources``) — into ``<out>/shards/{train,val,test}``;
2. trains two encoders with ``configs/demo.yaml`` through the same path as ``relic train``
   (``cluster.trainer.fit``: Ray Train ``TorchTrainer`` on a local Ray instance, 2 CPU workers, DDP
   over gloo, DALI CPU views): ReLIC with ``alpha = 0`` (plain InfoNCE against target-network
   negatives) and ReLIC with the configured ``alpha > 0``, same budget, same seed, same data order;
   the online kNN monitor scores the validation split after every epoch;
3. evaluates them and a randomly initialised encoder of the same architecture (the initial weights
   both runs started from) on frozen features: weighted kNN and linear probe fitted on the clean
   training split, scored on the clean test split and under every corruption of
   ``training.evaluate.CORRUPTIONS`` at severities 1..5;
4. writes ``<out>/report/{metrics.json, losses.png, robustness.png, report.md}`` (``commands.report``)
   and prints a short table with the report's path.

The recipe in ``configs/demo.yaml`` was chosen on the validation split only (see that file); the
test split is touched once, here, for the final numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
SPLITS = ("train", "val", "test")

# --quick: enough of everything to exercise every stage and fill every field of the report.
QUICK_OVERRIDES = (
    "data.global_batch_size=64",
    "data.knn_max_samples=300",
    "schedule.epochs=1",
    "schedule.warmup_epochs=0.2",
    "run.report_every=5",
    "run.knn_every=1",
    "model.projector_hidden_dim=64",
    "model.projector_out_dim=32",
)
QUICK_EVAL = {"max_train": 300, "max_test": 100, "severities": (1, 5)}


@dataclasses.dataclass
class EvalData:
    """Decoded labelled splits as uint8 [N, 3, S, S] + int64 labels, and the recipe's normalisation."""

    train: tuple[Any, Any]
    val: tuple[Any, Any]
    test: tuple[Any, Any]
    mean: Sequence[float]
    std: Sequence[float]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides for both trained runs"
    )
    parser.add_argument(
        "--out", default="runs/demo", help="run directory (shards, runs, report); default runs/demo"
    )
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="experiment config (default configs/demo.yaml)"
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="invariance weight of the alpha > 0 run (default: the config's)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a reduced run: a few steps, evaluation on subsets"
    )
    parser.add_argument(
        "--severities", default=None, help="comma-separated corruption severities (default 1,2,3,4,5)"
    )
    parser.add_argument("--max-train", type=int, default=None, help="evaluate with at most N training images")
    parser.add_argument("--max-test", type=int, default=None, help="evaluate on at most N test images")
    parser.add_argument("--worker-logs", action="store_true", help="forward the Ray workers' output")
    seeds = parser.add_argument_group(
        "comparisons over seeds (commands/seeds.py, commands/semppl_demo.py)",
        "pretrain two recipes once per seed with the same budget and report kNN and linear-probe "
        "accuracy as mean +- standard error and the paired difference: --seeds N alone compares ReLIC "
        "with alpha = 0 and alpha > 0 on the fully labelled digits; --semppl compares ReLIC and SemPPL "
        "(configs/demo_semppl.yaml) on the digits with --label-fraction of the labels",
    )
    seeds.add_argument("--seeds", type=int, default=None, help="seeds per recipe (default 3 with --semppl)")
    seeds.add_argument(
        "--semppl", action="store_true", help="compare ReLIC and SemPPL with a fraction of the labels"
    )
    seeds.add_argument(
        "--label-fraction",
        type=float,
        default=0.1,
        help="with --semppl: the fraction of labels kept (default 0.1)",
    )
    seeds.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs of every run (default: 30 with --semppl, else the config's)",
    )


class _Clock:
    """Progress lines with the elapsed time: ``[  12s] message``."""

    def __init__(self, stream: Any = None) -> None:
        self.start = time.monotonic()
        self.stream = stream

    def __call__(self, message: str) -> None:
        print(
            f"[{time.monotonic() - self.start:5.0f}s] {message}", file=self.stream or sys.stdout, flush=True
        )

    def elapsed(self) -> float:
        return time.monotonic() - self.start


# --------------------------------------------------------------------------------------------------
# Stages


def build_demo_shards(out: Path, image_size: int, log: Callable[[str], None]) -> dict[str, str]:
    """Digits shards per split under ``out/shards``; an existing complete split of the same size is
    reused (a shard set is visible only once its manifest is written)."""
    from pipeline.shards.build import build_shards
    from pipeline.shards.manifest import load_manifest

    urls = {}
    for split in SPLITS:
        target = out / "shards" / split
        urls[split] = str(target)
        source = f"builtin:digits?split={split}&size={image_size}"
        try:
            manifest = load_manifest(str(target))
            if manifest.source == source and manifest.total_samples > 0:
                log(f"shards: reusing {target} ({manifest.total_samples} images)")
                continue
        except (FileNotFoundError, OSError, ValueError):
            pass
        if target.exists():
            shutil.rmtree(target)
        manifest = build_shards(
            source, str(target), max_samples=512, index=True, progress=sys.stderr.isatty()
        )
        log(f"shards: built {target} — {manifest.total_samples} images in {len(manifest.shards)} shards")
    return urls


def train_encoders(
    cfg: Any, runs: Sequence[tuple[str, float]], log: Callable[[str], None], *, worker_logs: bool = False
) -> tuple[dict[str, Any], dict[str, float]]:
    """Train one run per ``(name, alpha)`` with ``cluster.trainer.fit`` on one Ray session; returns
    ``({name: FitResult}, {name: wall seconds})``. Each run starts fresh (a previous run directory of
    that name is removed)."""
    from cluster.trainer import fit, ray_session

    results, seconds = {}, {}
    cpus = math.ceil(cfg.scaling.max_workers * cfg.scaling.cpus_per_worker)
    with ray_session(num_cpus=cpus, worker_logs=worker_logs):
        for name, alpha in runs:
            run_cfg = dataclasses.replace(
                cfg,
                run=dataclasses.replace(cfg.run, name=name),
                objective=dataclasses.replace(cfg.objective, alpha=alpha),
            )
            run_dir = Path(run_cfg.run.storage) / name
            if run_dir.exists():
                shutil.rmtree(run_dir)
            log(
                f"train {name}: alpha={alpha:g}, {cfg.schedule.epochs} epochs, {cfg.scaling.num_workers} Ray workers"
            )
            t0 = time.monotonic()
            results[name] = fit(run_cfg, progress=lambda line, n=name: log(f"  {n}: {line}"))
            seconds[name] = time.monotonic() - t0
            log(f"train {name}: done in {seconds[name]:.0f} s, checkpoint {results[name].checkpoint}")
    return results, seconds


def load_eval_data(
    urls: Mapping[str, str], recipe: Any, *, max_train: int | None = None, max_test: int | None = None
) -> EvalData:
    from pipeline.labelled import load_labelled_images

    view = recipe.views[0]
    return EvalData(
        train=load_labelled_images(urls["train"], size=view.size, max_samples=max_train),
        val=load_labelled_images(urls["val"], size=view.size),
        test=load_labelled_images(urls["test"], size=view.size, max_samples=max_test),
        mean=view.mean,
        std=view.std,
    )


def evaluate_encoders(
    encoders: Mapping[str, Any],
    data: EvalData,
    *,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, dict[str, Any]]:
    """``{name: EncoderEvaluation.to_dict() + {"knn_val": validation kNN accuracy}}`` for each encoder:
    the numbers of the report, computed here from the encoders' weights."""
    from training.evaluate import CORRUPTIONS, evaluate_encoder, extract_features, knn_classify

    out = {}
    common = {"mean": data.mean, "std": data.std}
    for name, encoder in encoders.items():
        log(
            f"evaluate {name}: kNN and linear probe, clean and {len(CORRUPTIONS)} corruptions x {len(severities)} severities"
        )
        result = evaluate_encoder(
            encoder,
            *data.train,
            *data.test,
            knn_k=knn_k,
            knn_temperature=knn_temperature,
            severities=severities,
            log=lambda m, n=name: log(f"  {n}: {m}"),
            **common,
        )
        train_f, _ = extract_features(encoder, data.train[0], **common)
        val_f, _ = extract_features(encoder, data.val[0], **common)
        entry = result.to_dict()
        entry["knn_val"] = knn_classify(
            train_f, data.train[1], val_f, data.val[1], k=knn_k, temperature=knn_temperature
        )
        out[name] = entry
    return out


def initial_encoder(cfg: Any) -> Any:
    """The encoder both trained runs started from: ``build_train_state`` seeds torch with
    ``run.seed`` and then builds the model, and so does this (eval mode, never trained)."""
    import torch

    from training.model import build_model

    torch.manual_seed(cfg.run.seed)
    return build_model(cfg.model).encoder.eval()


def history_from_reports(reports: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """Loss terms per reported step and the kNN monitor's accuracy per completed epoch."""
    by_step: dict[int, Mapping[str, Any]] = {}
    for m in reports:
        by_step[int(m["step"])] = m  # after a restart the latest report of a step wins
    steps = sorted(by_step)
    h: dict[str, list] = {
        "step": steps,
        "loss": [float(by_step[s]["loss"]) for s in steps],
        "contrastive": [float(by_step[s]["contrastive"]) for s in steps],
        "invariance": [float(by_step[s]["invariance"]) for s in steps],
        "knn_epoch": [],
        "knn_acc": [],
    }
    for s in steps:
        m = by_step[s]
        if "knn_accuracy" in m:
            h["knn_epoch"].append(int(m["epoch"]) + 1)  # the monitor runs when epoch m["epoch"] is done
            h["knn_acc"].append(float(m["knn_accuracy"]))
    return h


def encoder_entry(
    label: str, alpha: float | None, evaluation: Mapping[str, Any], fit_result: Any | None, epochs: int
) -> dict[str, Any]:
    """One ``metrics["encoders"]`` entry (see ``commands.report``)."""
    history = (
        history_from_reports(fit_result.metrics)
        if fit_result is not None
        else {
            "step": [],
            "loss": [],
            "contrastive": [],
            "invariance": [],
            "knn_epoch": [0],
            "knn_acc": [evaluation["knn_val"]],
        }
    )
    last = fit_result.metrics[-1] if fit_result is not None and fit_result.metrics else None
    return {
        "label": label,
        "trained": fit_result is not None,
        "alpha": alpha,
        **{k: evaluation[k] for k in ("knn", "linear", "knn_corrupted", "linear_corrupted")},
        "knn_val": evaluation["knn_val"],
        "knn_per_corruption": evaluation["knn_per_corruption"],
        "linear_per_corruption": evaluation["linear_per_corruption"],
        "robustness": evaluation["robustness"],
        "final_loss": None if last is None else float(last["loss"]),
        "final_contrastive": None if last is None else float(last["contrastive"]),
        "final_invariance": None if last is None else float(last["invariance"]),
        "steps": 0 if last is None else int(last["step"]),
        "epochs": 0 if fit_result is None else epochs,
        "history": history,
    }


# --------------------------------------------------------------------------------------------------
# The command


def run(args: argparse.Namespace) -> int:
    if getattr(args, "semppl", False):
        from commands import semppl_demo

        args.seeds = 3 if args.seeds is None else args.seeds
        args.epochs = 30 if args.epochs is None else args.epochs
        return semppl_demo.run(args)
    if getattr(args, "seeds", None) is not None:
        from commands import seeds

        return seeds.run_alpha(args)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    log = _Clock()
    out = Path(args.out).resolve()
    from cluster.config import ConfigError, load_config

    base_overrides = list(QUICK_OVERRIDES if args.quick else ()) + list(args.overrides)
    try:
        probe_cfg = load_config(args.config, ["data.train=unused", *base_overrides])
    except ConfigError as e:
        print(f"relic demo: {e}", file=sys.stderr)
        return 2
    recipe = probe_cfg.views.recipe()
    image_size = recipe.views[0].size
    log(f"relic demo: config {args.config}, output {out}")

    t0 = time.monotonic()
    log("[1/4] building builtin:digits shards (train/val/test)")
    urls = build_demo_shards(out, image_size, log)
    shards_s = time.monotonic() - t0

    overrides = [
        f"data.train={urls['train']}",
        f"data.knn_train={urls['train']}",
        f"data.knn_val={urls['val']}",
        f"run.storage={out}",
        *base_overrides,
    ]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"relic demo: {e}", file=sys.stderr)
        return 2
    alpha = cfg.objective.alpha if args.alpha is None else args.alpha
    if alpha <= 0:
        print(
            f"relic demo: --alpha / objective.alpha: expected > 0 for the ReLIC run, got {alpha}",
            file=sys.stderr,
        )
        return 2
    runs = [("relic_alpha0", 0.0), ("relic", alpha)]
    log(f"[2/4] training {len(runs)} encoders with Ray Train (same budget; random init is the third)")
    fits, train_seconds = train_encoders(cfg, runs, log, worker_logs=args.worker_logs)

    log("[3/4] evaluating random init, alpha=0 and alpha>0 on frozen features")
    from cluster.checkpoint import load_model_from_checkpoint

    t_eval = time.monotonic()
    quick = QUICK_EVAL if args.quick else {}
    severities = (
        tuple(int(s) for s in args.severities.split(","))
        if args.severities
        else quick.get("severities", (1, 2, 3, 4, 5))
    )
    data = load_eval_data(
        urls,
        recipe,
        max_train=args.max_train or quick.get("max_train"),
        max_test=args.max_test or quick.get("max_test"),
    )
    encoders = {"random": initial_encoder(cfg)}
    for name, _ in runs:
        if fits[name].checkpoint is None:
            print(f"relic demo: run {name} wrote no checkpoint ({fits[name].run_dir})", file=sys.stderr)
            return 1
        encoders[name] = load_model_from_checkpoint(fits[name].checkpoint).encoder
    evaluations = evaluate_encoders(
        encoders,
        data,
        knn_k=cfg.run.knn_k,
        knn_temperature=cfg.run.knn_temperature,
        severities=severities,
        log=log,
    )
    eval_s = time.monotonic() - t_eval

    log("[4/4] writing the report")
    from cluster.trainer import git_sha
    from commands.report import terminal_table, write_report
    from training.evaluate import CORRUPTIONS

    labels = {"random": "random init", "relic_alpha0": "ReLIC alpha=0", "relic": f"ReLIC alpha={alpha:g}"}
    entries = {"random": encoder_entry(labels["random"], None, evaluations["random"], None, 0)}
    for name, a in runs:
        entries[name] = encoder_entry(labels[name], a, evaluations[name], fits[name], cfg.schedule.epochs)
    report_cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, alpha=alpha))
    metrics = {
        "schema": "relic-demo-report/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_sha": git_sha(),
        "config": report_cfg.to_dict(),
        "selection": selection_notes(args.config),
        "data": {
            "source": "builtin:digits (scikit-learn 8x8 digits, upscaled)",
            "train": len(data.train[1]),
            "val": len(data.val[1]),
            "test": len(data.test[1]),
            "classes": [str(c) for c in range(10)],
            "image_size": image_size,
        },
        "corruptions": list(CORRUPTIONS),
        "severities": list(severities),
        "timings": {
            "shards_s": round(shards_s, 1),
            "train_s": {name: round(train_seconds[name], 1) for name, _ in runs},
            "eval_s": round(eval_s, 1),
            "total_s": round(log.elapsed(), 1),
        },
        "encoders": entries,
    }
    paths = write_report(metrics, out / "report")
    print("", flush=True)
    print(terminal_table(metrics), flush=True)
    print(
        f"\naccuracies in % on the test split ({len(data.test[1])} images); corrupted = mean over "
        f"{len(CORRUPTIONS)} corruptions x {len(severities)} severities",
        flush=True,
    )
    print(f"report: {paths['report']}  (total {log.elapsed():.0f} s)", flush=True)
    return 0


def selection_notes(config_path: str) -> dict[str, str]:
    """The ``# selection:`` comment lines of the config: how its values were chosen (validation split)."""
    notes = {}
    try:
        for line in Path(config_path).read_text().splitlines():
            text = line.strip()
            if text.startswith("# selection:"):
                key, _, value = text.removeprefix("# selection:").partition("=")
                notes[key.strip()] = value.strip()
    except OSError:
        pass
    return notes
