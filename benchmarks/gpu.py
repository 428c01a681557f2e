"""GPU smoke test and throughput on one GPU: the DALI GPU pipeline and ReLIC ResNet-50 training steps.

    python -m benchmarks.gpu                       # builtin:photos shards in a temp dir, 2x224, bf16
    python -m benchmarks.gpu --data s3://bucket/imagenet/train --endpoint-url http://minio:9000
    python -m benchmarks.gpu --quick               # fewer steps, smaller batch

Three figures, in images per second, all through the production code path (the classes
``cluster.worker.train_loop`` uses, built from the same config file):

- ``dali_gpu``: ``ShardReader`` -> ``ViewLoader(device="cuda")``, i.e. DALI's GPU graph with the
  "mixed" (nvJPEG/hardware) decoder and the ReLIC recipe's two 224x224 views, no training;
- ``train_step``: ``training.loop.train_step`` on views already in GPU memory (ResNet-50 + critic,
  EMA target, ReLIC loss, LARS) in bf16 autocast: the compute ceiling;
- ``end_to_end``: the two together, as one training worker runs them.

Headline keys: ``dali_gpu_images_per_s``, ``train_step_images_per_s``, ``end_to_end_images_per_s``
and ``input_headroom`` = dali_gpu / train_step (>= 1: the input pipeline keeps up with the GPU).
Without a CUDA device the benchmark prints that it was skipped and exits 0.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import common

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "imagenet_r50_relic.yaml"


def parse_args(argv: list[str] | None):
    p = common.parser("gpu", __doc__.split("\n\n")[0])
    p.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="experiment config: model, objective, optimiser, views"
    )
    p.add_argument(
        "--data", help="shard directory or manifest (local or s3://); default: builtin:photos shards"
    )
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for --data")
    p.add_argument(
        "--batch-size", type=int, help="per-GPU batch (default: the config's per-worker batch, quick: 32)"
    )
    p.add_argument("--steps", type=int, help="measured steps per figure (default 30, quick 8)")
    p.add_argument("--warmup", type=int, help="unmeasured steps first (default 5, quick 3)")
    p.add_argument(
        "--device",
        default="cuda:0",
        help="cuda:N; `cpu` only checks the code path end to end (no GPU figures)",
    )
    return p.parse_args(argv)


def cycle_batches(loader, epochs_from: int = 0) -> Iterator[Any]:
    """Batches of consecutive epochs, for as long as the caller wants them."""
    epoch = epochs_from
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def timed(
    batches: Iterator[Any], step, *, warmup: int, steps: int, batch_size: int, device
) -> dict[str, float]:
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step(next(batches))
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    sync()
    seconds = time.perf_counter() - start
    return {"images_per_s": steps * batch_size / seconds, "seconds": seconds, "steps": steps}


def gpu_info(device) -> dict[str, Any]:
    import torch

    if device.type != "cuda":
        return {"name": "cpu (code-path check, not a GPU figure)"}
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_gib": props.total_memory / 2**30,
        "peak_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
    }


def run(args) -> dict[str, Any]:
    import nvidia.dali
    import torch

    from cluster.config import load_config
    from pipeline import storage
    from pipeline.loader import ViewBatch, ViewLoader
    from pipeline.reader import ShardReader
    from training.loop import build_train_state, train_step

    cfg = load_config(args.config)
    batch = args.batch_size or (32 if args.quick else cfg.per_worker_batch_size)
    steps = args.steps or (8 if args.quick else 30)
    warmup = args.warmup or (3 if args.quick else 5)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True

    tmp = None
    data = args.data
    if data is None:
        from pipeline.shards.build import build_shards

        tmp = tempfile.TemporaryDirectory(prefix="relic-gpu-bench-")
        data = tmp.name
        count = batch * (warmup + steps + 2)
        print(f"building {count} builtin:photos samples into {data} ...", flush=True)
        build_shards(f"builtin:photos?count={count}", data, max_samples=1024, index=True, progress=False)
    options = storage.storage_options(data, endpoint_url=args.endpoint_url)

    def loader_for(seed: int) -> ViewLoader:
        reader = ShardReader(
            data,
            batch_size=batch,
            num_workers=cfg.data.reader_workers,
            seed=seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            storage_options=options,
        )
        return ViewLoader(
            reader,
            cfg.views.recipe(),
            device=device,
            seed=seed,
            num_threads=cfg.views.num_threads,
            dtype=getattr(torch, cfg.views.dtype),
            channels_last=cfg.model.channels_last,
            prefetch=cfg.views.prefetch,
        )

    model_cfg = cfg.model
    if not model_cfg.bf16:
        print(
            "note: the config trains in fp32; this benchmark measures bf16 as on the cluster", file=sys.stderr
        )
    model_cfg = dataclasses.replace(model_cfg, bf16=True)
    state = build_train_state(
        model_cfg,
        cfg.objective,
        cfg.optim,
        cfg.schedule,
        steps_per_epoch=4 * (warmup + steps),
        global_batch=batch,
        device=device,
        seed=cfg.run.seed,
    )
    layout = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    recipe = cfg.views.recipe()
    synthetic = ViewBatch(
        views=[
            torch.randn(batch, 3, s, s, device=device).contiguous(memory_format=layout) for s in recipe.sizes
        ],
        labels=torch.zeros(batch, dtype=torch.int64, device=device),
        keys=[f"{i:09d}" for i in range(batch)],
        num_large=recipe.num_large,
    )

    def forever(item):
        while True:
            yield item

    measure = dict(warmup=warmup, steps=steps, batch_size=batch, device=device)
    results = {
        "dali_gpu": timed(cycle_batches(loader_for(1)), lambda b: None, **measure),
        "train_step": timed(forever(synthetic), lambda b: train_step(state, b), **measure),
        "end_to_end": timed(cycle_batches(loader_for(2)), lambda b: train_step(state, b), **measure),
    }
    for r in results.values():
        r["batch_size"] = batch
    if tmp is not None:
        tmp.cleanup()
    return {
        "results": results,
        "gpu": {
            **gpu_info(device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "dali": nvidia.dali.__version__,
        },
        "setup": {
            "config": str(args.config),
            "data": data if args.data else "builtin:photos (temporary)",
            "views": recipe.sizes,
            "arch": cfg.model.arch,
            "bf16": device.type == "cuda",  # train_step autocasts to bf16 on CUDA only
            "channels_last": cfg.model.channels_last,
            "warmup": warmup,
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        reason = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
        print(f"gpu benchmark skipped: {reason} (run `relic doctor` on the GPU node to see why)")
        return 0
    out = run(args)
    res = out["results"]
    setup, views = out["setup"], out["setup"]["views"]
    shape = f"{len(views)}x{views[0]}" if len(set(views)) == 1 else "+".join(map(str, views))
    common.print_table(
        [{"figure": name, **r} for name, r in res.items()],
        ["figure", "images_per_s", "batch_size", "steps", "seconds"],
        title=f"ReLIC {setup['arch']} {shape} {'bf16' if setup['bf16'] else 'fp32'} on {out['gpu']['name']}",
    )
    headline = {
        "dali_gpu_images_per_s": res["dali_gpu"]["images_per_s"],
        "train_step_images_per_s": res["train_step"]["images_per_s"],
        "end_to_end_images_per_s": res["end_to_end"]["images_per_s"],
        "input_headroom": res["dali_gpu"]["images_per_s"] / res["train_step"]["images_per_s"],
    }
    common.write_results(args.out, headline, res, gpu=out["gpu"], setup=out["setup"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
