"""``relic shards build|index|verify|inspect|masks``: the shard utility's command line.

    relic shards build ~/data/imagenet/train s3://bucket/imagenet/train --workers 16 --max-side 512 --index
    relic shards build ~/data/photos runs/photos --masks ~/data/photo-masks
    relic shards build builtin:digits?split=train runs/digits/train --max-samples 256 --index
    relic shards build builtin:digits?split=train runs/digits/train-10pc --label-fraction 0.1 --seed 1
    relic shards build ~/data/imagenet/train runs/imagenet-1pc --labelled-keys 1percent.txt
    relic shards index 's3://bucket/laion/{000000..000099}.tar' --index
    relic shards verify s3://bucket/imagenet/train --decode
    relic shards inspect runs/digits/train
    relic shards masks runs/digits/train --out runs/digits/train-masked --workers 4

S3 (and other fsspec URLs): ``--endpoint-url`` (or RELIC_S3_ENDPOINT_URL / AWS_ENDPOINT_URL) selects an
S3-compatible endpoint, ``--profile`` an AWS profile; credentials come from the usual environment,
profile or instance role and are never printed nor written into the manifest.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from pipeline import storage
from pipeline.shards.build import DEFAULT_MAX_PIXELS

SOURCE_HELP = """\
SOURCE is one of:
  DIR                    ImageFolder tree (class = sub-folder name, sorted); a folder without
                         sub-folders is one unlabelled set. Local path or fsspec URL (s3://...).
  LIST.csv | LIST.tsv    list with a header row: path[,label]; relative paths are resolved against
                         the list's folder; integer labels are class indices, others class names.
  builtin:digits[?split=train|val|test|all][&size=32]
                         scikit-learn's 1,797 8x8 digits, bicubic-upscaled to size x size RGB,
                         labelled 0..9. split: stratified 70/10/20 train/val/test with a fixed seed
                         (independent of --seed), so splits never overlap and never change.
  builtin:photos[?count=N]
                         N crops (longer side 375..500 px) of the photographs bundled with
                         scikit-image; unlabelled; for throughput tests (default N=2000).

Inputs that are already RGB baseline JPEGs within --max-side are stored byte for byte; everything
else (PNG, WebP, grayscale, CMYK, palette, alpha, progressive JPEG) becomes an RGB baseline JPEG at
--quality (baseline: the GPU hardware JPEG decoder takes no progressive files). Bad inputs are listed
in the manifest with their reason. Re-running an interrupted build resumes it.
"""

MASKS_HELP = """\
saliency masks for ReLICv2's background removal (255 = keep, 0 = background). The mask of the input
at relative path a/b/c.jpg is DIR/a/b/c.png, else DIR/a/b/c.<jpg|jpeg|webp|bmp|gif|tif|tiff> (the
input's own suffix first); relative to the SOURCE folder, or as a list writes the path (absolute
paths and URLs in a list, and builtin sources, have no mask path). A mask follows its image as
displayed (EXIF orientation applied), must have its aspect ratio (within a pixel), and is stored as
8-bit greyscale PNG {key}.mask.png: RGBA/LA/transparent palette by their alpha when any pixel is not
opaque, other colour masks by luminance, 1-bit as 0/255, 16-bit scaled by depth (65535 -> 255); a
mask larger than the stored image (--max-side) is shrunk to its size. Inputs without a mask are stored
without one and counted; unreadable or misshapen masks are listed in the manifest's rejected inputs
(the image is kept without a mask)"""

LABEL_FRACTION_HELP = """\
keep the labels of a class-balanced fraction F (0 < F <= 1) of a labelled SOURCE, for
semi-supervised pretraining (SemPPL); every other sample is stored with label -1 (.cls "-1"). Class c
with n_c inputs keeps max(1, round(F * n_c)) labels (round half to even), the first of a permutation
seeded by (--seed, class index) of the class's inputs in listing order (relative path for a folder,
row for a list), so the choice does not depend on --workers or --max-samples. The manifest's
"labelled" records F, the seed and the counts per class"""

LABELLED_KEYS_HELP = """\
keep the labels of the inputs FILE names (one per line, blank lines ignored) and store every other
sample with label -1; instead of --label-fraction. A line names inputs by, first, the input as SOURCE
lists it (path relative to the SOURCE folder, e.g. n01440764/n01440764_10026.JPEG; the path as a list
writes it; builtin:digits#5), else by file name (n01440764_10026.JPEG: SimCLR's 1%%/10%% ImageNet
subset files work as they are; a name shared by several inputs is refused), else by sample key of
this build (000000042, as inspect shows it; keys follow --seed). A line that names no input is an
error, before anything is written. Local path or fsspec URL"""


def parse_size(text: str) -> int:
    """``"512MB"`` -> 512_000_000; plain integers are bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1000000, 512MB, 1GiB)")
    unit = (m.group(2) or "").rstrip("b")
    factor = {
        "": 1,
        "k": 1e3,
        "m": 1e6,
        "g": 1e9,
        "t": 1e12,
        "ki": 2**10,
        "mi": 2**20,
        "gi": 2**30,
        "ti": 2**40,
    }
    return int(float(m.group(1)) * factor[unit])


def _storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint-url", help="S3-compatible endpoint (default: RELIC_S3_ENDPOINT_URL/AWS_ENDPOINT_URL)"
    )
    p.add_argument("--profile", help="AWS profile for s3:// URLs (credentials never leave s3fs)")


def _progress_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="always show a progress bar"
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="never show a progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(
        dest="shards_command", metavar="{build,index,verify,inspect,masks}", required=True
    )

    b = sub.add_parser(
        "build",
        help="build WebDataset shards from a folder, a list or a built-in set",
        description="Build WebDataset tar shards, manifest.json and (--index) DALI .idx files from SOURCE into OUT.",
        epilog=SOURCE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("source", metavar="SOURCE", help="folder, CSV/TSV list, builtin:digits or builtin:photos")
    b.add_argument(
        "out", metavar="OUT", help="output directory: local path or fsspec URL (s3://bucket/prefix)"
    )
    b.add_argument("--max-samples", type=int, default=10000, help="samples per shard at most (default 10000)")
    b.add_argument("--max-bytes", type=parse_size, default=None, help="bytes per shard at most, e.g. 1GB")
    b.add_argument(
        "--workers",
        type=int,
        default=1,
        help="parallel worker processes (default 1); work is split by shard, so a set needs >= 2 shards per worker",
    )
    b.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the input shuffle and of --label-fraction's choice (default 0)",
    )
    b.add_argument("--max-side", type=int, default=None, help="downscale so the longer side is at most this")
    b.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (default 95)")
    b.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"reject inputs of more pixels, before decoding them (default {DEFAULT_MAX_PIXELS:,})",
    )
    b.add_argument("--index", action="store_true", help="also write DALI .idx files beside the shards")
    b.add_argument("--prefix", default="shard", help="shard file prefix: PREFIX-000000.tar (default shard)")
    b.add_argument(
        "--split", choices=["train", "val", "test", "all"], help="builtin:digits split (or ?split=)"
    )
    b.add_argument("--digits-size", type=int, default=32, help="builtin:digits side in pixels (default 32)")
    b.add_argument("--photos-count", type=int, default=None, help="builtin:photos crops (default 2000)")
    b.add_argument("--masks", metavar="DIR", help=MASKS_HELP)
    b.add_argument("--label-fraction", metavar="F", type=float, default=None, help=LABEL_FRACTION_HELP)
    b.add_argument("--labelled-keys", metavar="FILE", default=None, help=LABELLED_KEYS_HELP)
    _storage_args(b)
    _progress_args(b)

    i = sub.add_parser("index", help="write our manifest (and .idx files) for shards made elsewhere")
    i.add_argument(
        "url",
        metavar="URL",
        help="brace pattern ('s3://b/train-{000000..000099}.tar'), list file, directory or .tar",
    )
    i.add_argument("--out", help="directory for manifest.json (default: the shards' directory)")
    i.add_argument(
        "--index", action="store_true", help="also write DALI .idx files beside the (uncompressed) shards"
    )
    i.add_argument(
        "--strict",
        action="store_true",
        help="fail on the first unreadable shard instead of leaving it out (listed in the manifest)",
    )
    i.add_argument(
        "--label-key", help="JSON field holding the class index (default: .cls, else label/cls/class/target)"
    )
    i.add_argument("--workers", type=int, default=4, help="shards scanned in parallel (default 4)")
    _storage_args(i)
    _progress_args(i)

    v = sub.add_parser("verify", help="check shards against their manifest; non-zero exit on any mismatch")
    v.add_argument("out", metavar="OUT", help="shard directory or manifest URL")
    v.add_argument("--decode", action="store_true", help="also decode every image")
    v.add_argument("--workers", type=int, default=4, help="shards checked in parallel (default 4)")
    _storage_args(v)

    n = sub.add_parser("inspect", help="summary: shards, samples, classes, sizes, first keys")
    n.add_argument("out", metavar="OUT", help="shard directory or manifest URL")
    n.add_argument("--keys", type=int, default=5, help="how many first keys to show (default 5)")
    _storage_args(n)

    k = sub.add_parser(
        "masks",
        help="compute saliency masks for an existing shard set (in place or into --out)",
        description=(
            "Compute a saliency mask for every sample of the shard set SHARDS and write the set with "
            "{key}.mask.png members added after each image (existing masks replaced, other members "
            "copied as they are): into --out, or in place. Each shard is published atomically with its "
            "DALI index file regenerated; manifest.json comes last. Deterministic: the same input gives "
            "byte-identical output. Images that do not decode are counted and listed in the manifest, "
            "their samples kept without a mask. Method spectral-residual: Hou & Zhang, CVPR 2007, at "
            "64 px wide (pipeline/shards/masks.py)."
        ),
    )
    k.add_argument("shards", metavar="SHARDS", help="shard directory or manifest URL (local or s3://...)")
    k.add_argument("--method", choices=["spectral-residual"], default="spectral-residual")
    k.add_argument("--out", help="write the masked set here (default: rewrite SHARDS in place)")
    k.add_argument(
        "--workers", type=int, default=1, help="shards processed in parallel processes (default 1)"
    )
    _storage_args(k)
    _progress_args(k)


def _options(url: str, args: argparse.Namespace) -> dict:
    return storage.storage_options(url, endpoint_url=args.endpoint_url, profile=args.profile)


def run(args: argparse.Namespace) -> int:
    from pipeline.shards.build import BuildError
    from pipeline.shards.index import ShardIndexError
    from pipeline.shards.sources import SourceError

    try:
        return {"build": _build, "index": _index, "verify": _verify, "inspect": _inspect, "masks": _masks}[
            args.shards_command
        ](args)
    except (SourceError, BuildError, ShardIndexError, FileNotFoundError, ValueError) as e:
        print(f"relic shards {args.shards_command}: error: {e}", file=sys.stderr)
        return 2


def _build(args: argparse.Namespace) -> int:
    from pipeline.shards.build import build_shards

    start = time.perf_counter()
    m = build_shards(
        args.source,
        args.out,
        max_samples=args.max_samples,
        max_bytes=args.max_bytes,
        workers=args.workers,
        seed=args.seed,
        max_side=args.max_side,
        quality=args.quality,
        max_pixels=args.max_pixels,
        index=args.index,
        prefix=args.prefix,
        storage_options=_options(args.out, args),
        source_storage_options=_options(args.source, args) if storage.is_remote(args.source) else None,
        progress=args.progress,
        digits_size=args.digits_size,
        photos_count=args.photos_count,
        split=args.split,
        masks=args.masks,
        masks_storage_options=_options(args.masks, args)
        if args.masks and storage.is_remote(args.masks)
        else None,
        label_fraction=args.label_fraction,
        labelled_keys=args.labelled_keys,
        labelled_keys_storage_options=_options(args.labelled_keys, args)
        if args.labelled_keys and storage.is_remote(args.labelled_keys)
        else None,
    )
    seconds = time.perf_counter() - start
    print(
        f"wrote {m.total_samples:,} samples in {len(m.shards):,} shards ({m.total_bytes / 1e6:,.1f} MB) to "
        f"{m.url} in {seconds:.1f} s ({m.total_samples / max(seconds, 1e-9):,.0f} samples/s); "
        f"{m.encoding.get('passthrough', 0):,} stored as-is, {m.encoding.get('reencoded', 0):,} re-encoded"
    )
    if m.masks is not None:
        print(
            f"masks: {m.masks['samples']:,} stored, {m.masks['missing']:,} inputs without a mask, "
            f"{m.masks['rejected']:,} masks rejected (listed below with the inputs)"
        )
    if m.labelled is not None:
        p = m.labelled
        print(
            f"labels: {p['labelled']:,} samples keep theirs, {p['unlabelled']:,} stored unlabelled (-1); "
            + ", ".join(f"{c}: {n:,}" for c, n in p["per_class"].items())
        )
    print(f"rejected {len(m.rejected):,} inputs" + (" (reasons in manifest.json):" if m.rejected else ""))
    for r in m.rejected[:10]:
        print(f"  {r.input}: {r.reason}")
    if len(m.rejected) > 10:
        print(f"  ... and {len(m.rejected) - 10:,} more")
    return 0


def _index(args: argparse.Namespace) -> int:
    from pipeline.shards.index import index_shards

    m = index_shards(
        args.url,
        args.out,
        write_idx=args.index,
        strict=args.strict,
        workers=args.workers,
        label_key=args.label_key,
        storage_options=_options(args.url, args),
        progress=args.progress,
    )
    label = (
        f".{m.label_ext}" + (f" field {m.label_key!r}" if m.label_key else "") if m.label_ext else "no labels"
    )
    print(
        f"indexed {len(m.shards):,} shards, {m.total_samples:,} samples ({m.total_bytes / 1e6:,.1f} MB): "
        f"images .{m.image_ext}, {label}; wrote {m.url}" + (" and .idx files" if args.index else "")
    )
    left_out = [r for r in m.rejected if r.reason.startswith("shard left out")]
    for r in left_out:
        print(f"  {r.input}: {r.reason}")
    if left_out:
        print(f"{len(left_out):,} shards left out (listed in the manifest); --strict makes this an error")
    no_image = len(m.rejected) - len(left_out)
    if no_image:
        print(f"{no_image:,} samples have no image member (listed in the manifest)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pipeline.shards.verify import verify_shards

    problems = verify_shards(
        args.out, decode=args.decode, storage_options=_options(args.out, args), workers=args.workers
    )
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {args.out}", file=sys.stderr)
        return 1
    print(
        f"OK: every shard of {args.out} matches its manifest"
        + (" and every image decodes" if args.decode else "")
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from pipeline.shards.inspect import inspect_shards

    print(inspect_shards(args.out, storage_options=_options(args.out, args), keys=args.keys))
    return 0


def _masks(args: argparse.Namespace) -> int:
    from pipeline.shards.build import add_masks

    start = time.perf_counter()
    m = add_masks(
        args.shards,
        args.out,
        method=args.method,
        workers=args.workers,
        storage_options=_options(args.shards, args),
        out_storage_options=_options(args.out, args) if args.out else None,
        progress=args.progress,
    )
    seconds = time.perf_counter() - start
    masks = m.masks or {}
    print(
        f"wrote {masks.get('samples', 0):,} masks ({masks.get('method')}) for {m.total_samples:,} samples "
        f"in {len(m.shards):,} shards to {m.url} in {seconds:.1f} s "
        f"({m.total_samples / max(seconds, 1e-9):,.0f} images/s); "
        f"{masks.get('rejected', 0):,} images did not decode, {masks.get('missing', 0):,} samples have no image"
    )
    return 0
