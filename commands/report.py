"""The demo's evaluation report: ``metrics.json``, two PNG figures and ``report.md``.

``metrics`` is one JSON-safe dict (schema below, checked by :func:`check_metrics`); everything in
the figures, the Markdown and the terminal table is rendered from it, so the files cannot disagree.

    {
      "schema": "relic-demo-report/1", "created": ISO-8601 UTC, "git_sha": str | null,
      "config": {...resolved ExperimentConfig of the alpha > 0 run...},
      "selection": {...how the recipe was chosen (validation split)...},
      "data": {"train": N, "val": N, "test": N, "classes": [...], "image_size": S, "source": str},
      "corruptions": [...], "severities": [...],
      "timings": {"shards_s": s, "train_s": {...}, "eval_s": {...}, "total_s": s},
      "encoders": {                      # in display order: random, ReLIC alpha = 0, ReLIC alpha > 0
        name: {
          "label": str, "trained": bool, "alpha": float | null,
          "knn": acc, "linear": acc,                         # clean test split
          "knn_corrupted": acc, "linear_corrupted": acc,     # mean over corruptions and severities
          "knn_per_corruption": {c: acc}, "linear_per_corruption": {c: acc},   # mean over severities
          "robustness": {"knn"|"linear": {c: {"1": acc, ..., "5": acc}}},
          "final_loss": x | null, "final_contrastive": x | null, "final_invariance": x | null,
          "steps": int, "epochs": int,
          "history": {"step": [...], "loss": [...], "contrastive": [...], "invariance": [...],
                      "knn_epoch": [...], "knn_acc": [...]}   # kNN monitor on the validation split
        }
      }
    }

Figures use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SCHEMA = "relic-demo-report/1"
TOP_LEVEL_KEYS = (
    "schema",
    "created",
    "git_sha",
    "config",
    "selection",
    "data",
    "corruptions",
    "severities",
    "timings",
    "encoders",
)
ENCODER_KEYS = (
    "label",
    "trained",
    "alpha",
    "knn",
    "linear",
    "knn_corrupted",
    "linear_corrupted",
    "knn_per_corruption",
    "linear_per_corruption",
    "robustness",
    "final_loss",
    "final_contrastive",
    "final_invariance",
    "steps",
    "epochs",
    "history",
)
HISTORY_KEYS = ("step", "loss", "contrastive", "invariance", "knn_epoch", "knn_acc")
PROBES = ("knn", "linear")
PROBE_LABELS = {"knn": "weighted kNN", "linear": "linear probe"}


def _is_acc(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x <= 1.0


def check_metrics(metrics: Mapping[str, Any]) -> list[str]:
    """Every problem with ``metrics`` as a message naming the key; empty when well-formed."""
    problems = [f"missing key {k!r}" for k in TOP_LEVEL_KEYS if k not in metrics]
    if problems:
        return problems
    if metrics["schema"] != SCHEMA:
        problems.append(f"schema: expected {SCHEMA!r}, got {metrics['schema']!r}")
    corruptions = list(metrics["corruptions"])
    severities = [str(s) for s in metrics["severities"]]
    encoders = metrics["encoders"]
    if not isinstance(encoders, Mapping) or not encoders:
        return [*problems, "encoders: expected a non-empty mapping"]
    for name, enc in encoders.items():
        where = f"encoders.{name}"
        missing = [k for k in ENCODER_KEYS if k not in enc]
        if missing:
            problems.extend(f"{where}: missing key {k!r}" for k in missing)
            continue
        for probe in PROBES:
            for key in (probe, f"{probe}_corrupted"):
                if not _is_acc(enc[key]):
                    problems.append(f"{where}.{key}: expected an accuracy in [0, 1], got {enc[key]!r}")
            per = enc[f"{probe}_per_corruption"]
            if sorted(per) != sorted(corruptions) or not all(_is_acc(v) for v in per.values()):
                problems.append(
                    f"{where}.{probe}_per_corruption: expected an accuracy for each of {corruptions}"
                )
            rob = enc["robustness"].get(probe, {})
            for c in corruptions:
                sev = rob.get(c, {})
                if sorted(map(str, sev)) != sorted(severities) or not all(_is_acc(v) for v in sev.values()):
                    problems.append(
                        f"{where}.robustness.{probe}.{c}: expected an accuracy for severities {severities}"
                    )
        history = enc["history"]
        missing_h = [k for k in HISTORY_KEYS if k not in history]
        if missing_h:
            problems.append(f"{where}.history: missing {missing_h}")
            continue
        n = len(history["step"])
        for k in ("loss", "contrastive", "invariance"):
            if len(history[k]) != n:
                problems.append(
                    f"{where}.history.{k}: expected {n} values (one per step), got {len(history[k])}"
                )
        if len(history["knn_acc"]) != len(history["knn_epoch"]):
            problems.append(f"{where}.history.knn_acc: expected one value per knn_epoch")
        if enc["trained"]:
            if n == 0:
                problems.append(f"{where}.history.step: a trained encoder needs its loss curve")
            for k in ("final_loss", "final_contrastive", "final_invariance"):
                v = enc[k]
                if not isinstance(v, (int, float)) or not math.isfinite(v):
                    problems.append(f"{where}.{k}: expected a finite number for a trained encoder, got {v!r}")
    return problems


def comparison(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Differences the report states: each trained encoder minus random, and alpha > 0 minus alpha = 0
    (keys ``<a>_minus_<b>`` -> ``{knn, linear, knn_corrupted, linear_corrupted}`` in accuracy points)."""
    encoders = metrics["encoders"]
    keys = ("knn", "linear", "knn_corrupted", "linear_corrupted")

    def diff(a: str, b: str) -> dict[str, float]:
        return {k: encoders[a][k] - encoders[b][k] for k in keys}

    out: dict[str, Any] = {}
    trained = [n for n, e in encoders.items() if e["trained"]]
    untrained = [n for n, e in encoders.items() if not e["trained"]]
    for t in trained:
        for u in untrained:
            out[f"{t}_minus_{u}"] = diff(t, u)
    zero = [n for n in trained if encoders[n]["alpha"] == 0]
    positive = [n for n in trained if (encoders[n]["alpha"] or 0) > 0]
    if zero and positive:
        out[f"{positive[0]}_minus_{zero[0]}"] = diff(positive[0], zero[0])
    return out


# --------------------------------------------------------------------------------------------------
# Figures


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def plot_losses(metrics: Mapping[str, Any], path: str | Path) -> None:
    """Contrastive and invariance terms over optimiser steps, and validation kNN accuracy over epochs,
    for every trained encoder (the random encoder's kNN accuracy as a horizontal reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (_name, enc) in enumerate(metrics["encoders"].items()):
        colour = colours[i % len(colours)]
        h = enc["history"]
        if enc["trained"] and h["step"]:
            axes[0].plot(h["step"], h["contrastive"], color=colour, label=enc["label"])
            axes[1].plot(h["step"], h["invariance"], color=colour, label=enc["label"])
        if enc["trained"] and h["knn_epoch"]:
            axes[2].plot(
                h["knn_epoch"], [100 * a for a in h["knn_acc"]], "o-", color=colour, label=enc["label"]
            )
        elif h["knn_acc"]:  # an untrained encoder: one value, drawn as a reference line
            axes[2].axhline(100 * h["knn_acc"][-1], color=colour, ls="--", label=enc["label"])
    axes[0].set(title="contrastive term (InfoNCE)", xlabel="optimiser step", ylabel="nats")
    axes[1].set(title="invariance term (KL, before the alpha weight)", xlabel="optimiser step", ylabel="nats")
    axes[2].set(title="kNN accuracy on the validation split", xlabel="epoch", ylabel="accuracy (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_robustness(metrics: Mapping[str, Any], path: str | Path) -> None:
    """Grouped bars per probe: clean accuracy, each corruption (mean over severities) and the mean
    over all corruptions, one bar per encoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corruptions = list(metrics["corruptions"])
    groups = ["clean", *corruptions, "corrupted\n(mean)"]
    encoders = list(metrics["encoders"].values())
    fig, axes = plt.subplots(len(PROBES), 1, figsize=(13, 4.2 * len(PROBES)))
    width = 0.8 / len(encoders)
    for ax, probe in zip(axes, PROBES):
        for i, enc in enumerate(encoders):
            values = [
                enc[probe],
                *(enc[f"{probe}_per_corruption"][c] for c in corruptions),
                enc[f"{probe}_corrupted"],
            ]
            xs = [g + (i - (len(encoders) - 1) / 2) * width for g in range(len(groups))]
            bars = ax.bar(xs, [100 * v for v in values], width, label=enc["label"])
            ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
        ax.set_xticks(range(len(groups)), [g.replace("_", " ") for g in groups], fontsize=8)
        ax.set(ylabel="test accuracy (%)", title=f"{PROBE_LABELS[probe]}: clean vs corrupted test images")
        low = min(100 * min(enc[f"{probe}_per_corruption"].values(), default=enc[probe]) for enc in encoders)
        ax.set_ylim(max(0.0, low - 10), 101)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Text


def terminal_table(metrics: Mapping[str, Any]) -> str:
    """The short table the demo prints last (accuracies in %)."""
    header = f"{'encoder':<22} {'kNN':>6} {'kNN corr':>9} {'linear':>7} {'lin corr':>9} {'invariance':>11}"
    lines = [header, "-" * len(header)]
    for enc in metrics["encoders"].values():
        inv = enc["final_invariance"]
        lines.append(
            f"{enc['label']:<22} {_pct(enc['knn']):>6} {_pct(enc['knn_corrupted']):>9} "
            f"{_pct(enc['linear']):>7} {_pct(enc['linear_corrupted']):>9} "
            f"{('-' if inv is None else f'{inv:.4f}'):>11}"
        )
    return "\n".join(lines)


def _binomial_se(accuracy: float, n: Any) -> float | None:
    """sqrt(p (1 - p) / n), or None without a sample count."""
    if not isinstance(n, int) or n <= 0:
        return None
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n)


def _standard_error(accuracy: float, n: Any) -> str:
    """``_binomial_se`` in accuracy points, as text."""
    se = _binomial_se(accuracy, n)
    return "n/a" if se is None else f"{100 * se:.1f} points"


def _signed(points: float) -> str:
    return f"{100 * points:+.1f} points"


def render_markdown(metrics: Mapping[str, Any]) -> str:
    """``report.md``: what ran, the numbers, the comparisons stated plainly, the figures."""
    encoders = metrics["encoders"]
    data = metrics["data"]
    cfg = metrics["config"]
    corruptions = list(metrics["corruptions"])
    severities = list(metrics["severities"])
    out: list[str] = ["# ReLIC demo report", ""]
    out.append(
        f"Generated {metrics['created']} (git {metrics['git_sha'] or 'unknown'}). Data: `{data['source']}` — "
        f"{data['train']} training, {data['val']} validation and {data['test']} test images "
        f"({len(data['classes'])} classes, {data['image_size']}x{data['image_size']} RGB)."
    )
    out.append("")
    model, objective, schedule = cfg.get("model", {}), cfg.get("objective", {}), cfg.get("schedule", {})
    views, scaling, optim = cfg.get("views", {}), cfg.get("scaling", {}), cfg.get("optim", {})
    data_cfg = cfg.get("data", {})
    trained = [e for e in encoders.values() if e["trained"]]
    out.append(
        f"Three encoders with the same architecture ({model.get('arch')}, width {model.get('width', 1.0):g}, "
        f"small_stem={model.get('small_stem')}): one randomly initialised and never trained, and "
        + " and ".join(f"{e['label']}" for e in trained)
        + f", each pretrained for {trained[0]['steps'] if trained else 0} optimiser steps ("
        + (
            f"{schedule.get('epochs')} epochs"
            if not cfg.get("run", {}).get("max_steps")
            else f"schedule of {schedule.get('epochs')} epochs cut at run.max_steps"
        )
        + ") "
        f"on the training split with Ray Train ({scaling.get('num_workers')} CPU workers, global batch "
        f"{data_cfg.get('global_batch_size')}), views preset `{views.get('preset')}` {views.get('options') or ''}, "
        f"temperature {objective.get('temperature')}, optimiser {optim.get('name')} (base lr {optim.get('base_lr')})."
    )
    out.append("")
    out.append(
        "Evaluation on frozen features (labels used only here): weighted kNN "
        f"(k={cfg.get('run', {}).get('knn_k', 20)}, T={cfg.get('run', {}).get('knn_temperature', 0.07)}; "
        "Wu et al. 2018) and a linear probe (L-BFGS logistic regression on standardised features), both fitted on the "
        "clean training split and scored on the test split — clean, and under "
        f"{len(corruptions)} corruptions ({', '.join(corruptions)}) at severities "
        f"{', '.join(map(str, severities))} (ImageNet-C definitions with the CIFAR-10-C parameters for "
        "small images; Hendrycks & Dietterich 2019). 'corrupted' is the mean over every corruption and severity."
    )
    out.append("")
    out.append("## Results (test split, accuracy %)")
    out.append("")
    out.append(
        "| encoder | kNN clean | kNN corrupted | linear clean | linear corrupted | final invariance | final contrastive |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for enc in encoders.values():
        inv, con = enc["final_invariance"], enc["final_contrastive"]
        out.append(
            f"| {enc['label']} | {_pct(enc['knn'])} | {_pct(enc['knn_corrupted'])} | {_pct(enc['linear'])} | "
            f"{_pct(enc['linear_corrupted'])} | {'-' if inv is None else f'{inv:.4f}'} | "
            f"{'-' if con is None else f'{con:.3f}'} |"
        )
    out.append("")
    for probe in PROBES:
        out.append(f"### {PROBE_LABELS[probe]} per corruption (mean over severities, %)")
        out.append("")
        out.append("| encoder | clean | " + " | ".join(c.replace("_", " ") for c in corruptions) + " |")
        out.append("|---|---:|" + "---:|" * len(corruptions))
        for enc in encoders.values():
            cells = [_pct(enc[f"{probe}_per_corruption"][c]) for c in corruptions]
            out.append(f"| {enc['label']} | {_pct(enc[probe])} | " + " | ".join(cells) + " |")
        out.append("")
    out.append("## What the numbers say")
    out.append("")
    for key, d in comparison(metrics).items():
        a, _, b = key.partition("_minus_")
        la, lb = encoders[a]["label"], encoders[b]["label"]
        parts = []
        for probe in PROBES:
            parts.append(
                f"{PROBE_LABELS[probe]} {_signed(d[probe])} clean, {_signed(d[f'{probe}_corrupted'])} corrupted"
            )
        out.append(f"- **{la} vs {lb}**: " + "; ".join(parts) + ".")
        if encoders[b]["trained"]:
            better = [p for p in PROBES if d[f"{p}_corrupted"] > 0]
            if len(better) == len(PROBES):
                verdict = "yes — alpha > 0 is more accurate under corruptions with both probes"
            elif better:
                verdict = f"mixed — alpha > 0 is more accurate under corruptions only with the {PROBE_LABELS[better[0]]}"
            else:
                verdict = "no — alpha > 0 is not more accurate under corruptions on this run"
            se = _standard_error(encoders[a]["knn_corrupted"], data.get("test"))
            errors = [
                _binomial_se(encoders[x][f"{p}_corrupted"], data.get("test")) for x in (a, b) for p in PROBES
            ]
            if None not in errors:
                noise = max(errors)
                if all(abs(d[f"{p}_corrupted"]) < noise for p in PROBES):
                    verdict += (
                        " (both differences are smaller than one standard error: no measurable difference)"
                    )
            out.append(
                f"- **Does alpha > 0 beat alpha = 0 under corruptions?** {verdict}. For scale: one accuracy "
                f"on {data.get('test')} test images has a binomial standard error of about {se}, and this is "
                "one training seed; differences of a point or two are within that noise."
            )
    out.append("")
    sel = metrics.get("selection") or {}
    if sel:
        out.append("## How the recipe was chosen")
        out.append("")
        for k, v in sel.items():
            out.append(f"- {k}: {v}")
        out.append("")
    out.append("## Figures")
    out.append("")
    out.append("![loss terms and validation kNN accuracy](losses.png)")
    out.append("")
    out.append("![clean vs corrupted accuracy per encoder](robustness.png)")
    out.append("")
    timings = ", ".join(
        f"{k.replace('_s', '').replace('.', ' ')} {v:.0f} s" for k, v in _flat(metrics["timings"])
    )
    out.append(f"Wall time: {timings}.")
    out.append("")
    out.append("Every number above is in `metrics.json` beside this file.")
    out.append("")
    return "\n".join(out)


def _flat(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            items.extend(_flat(v, f"{prefix}{k}."))
        else:
            items.append((f"{prefix}{k}", v))
    return items


def write_report(metrics: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Check ``metrics`` and write metrics.json, losses.png, robustness.png, report.md into ``out_dir``."""
    problems = check_metrics(metrics)
    if problems:
        raise ValueError("report metrics are malformed: " + "; ".join(problems))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": out / "metrics.json",
        "losses": out / "losses.png",
        "robustness": out / "robustness.png",
        "report": out / "report.md",
    }
    full = {**metrics, "comparison": comparison(metrics)}
    paths["metrics"].write_text(json.dumps(full, indent=2, allow_nan=False) + "\n")
    plot_losses(metrics, paths["losses"])
    plot_robustness(metrics, paths["robustness"])
    paths["report"].write_text(render_markdown(metrics))
    return paths
