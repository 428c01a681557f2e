"""``manifest.json``: the description of a shard set that every other component reads.

It lives beside the shards and lists every shard with its sample count, byte size and sha256, which
tar member extension holds the image and which the label, the class names, the encoding settings and
every input that was rejected with its reason. Shard and index names are relative to the manifest's
directory, so a shard set can be copied between a local disk and a bucket unchanged.

``masks`` says whether samples carry saliency masks (:mod:`pipeline.shards.masks`): ``None`` for a set
without (and for manifests written before masks existed), else ``{"member": "mask.png", "samples":
samples with a mask, "method": "given:DIR" | "spectral_residual" | "indexed", "rejected": masks
refused (their images kept, each listed in ``rejected``), "missing": samples without a mask}``.

``labelled`` says whether only some samples keep their class (:mod:`pipeline.shards.partial_labels`):
``None`` when every sample of a labelled set carries its label (and for manifests written before
partial labels existed), else ``{"fraction": F | None, "seed": S | None, "keys_file": FILE | None,
"labelled": samples with a class, "unlabelled": samples with label -1, "per_class": {class name:
labelled samples}}``. ``class_counts`` then counts the labelled samples only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from pipeline import storage
from pipeline.shards.format import IMAGE_EXTS, LABEL_EXTS, LabelRule
from pipeline.shards.masks import MASK_EXT

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class ShardInfo:
    name: str  # file name relative to the manifest's directory, e.g. "train-000000.tar"
    samples: int
    bytes: int
    sha256: str
    index: str | None = None  # DALI index file name beside the shard, when written


@dataclass
class Rejected:
    input: str  # the input as the user named it (path, CSV row, builtin id)
    reason: str  # short, human-readable: "truncated image", "not an image", "empty file", ...


@dataclass
class Manifest:
    shards: list[ShardInfo]
    image_ext: str = "jpg"  # tar member extension holding the encoded image
    label_ext: str | None = "cls"  # "cls" (decimal text), "json" (field label_key) or None
    label_key: str | None = None  # JSON field with the class index when label_ext == "json"
    classes: list[str] | None = None  # class index -> name
    class_counts: dict[str, int] | None = None  # class name -> samples
    encoding: dict[str, Any] = field(default_factory=dict)  # quality, max_side, seed, limits, prefix
    source: str = ""  # what was built from (never contains credentials)
    rejected: list[Rejected] = field(default_factory=list)
    masks: dict[str, Any] | None = None  # saliency masks (module doc); None: the set has none
    labelled: dict[str, Any] | None = None  # partly labelled set (module doc); None: all labelled
    created_by: str = "relic-ssl"
    format_version: int = FORMAT_VERSION
    # Where this manifest was loaded from; not serialised. Shard URLs are resolved against it.
    url: str | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.image_ext not in IMAGE_EXTS:
            raise ValueError(f"manifest image_ext must be one of {IMAGE_EXTS}, got {self.image_ext!r}")
        if self.label_ext not in (*LABEL_EXTS, None):
            raise ValueError(
                f"manifest label_ext must be one of {LABEL_EXTS} or null, got {self.label_ext!r}"
            )
        if self.masks is not None and self.masks.get("member", MASK_EXT) != MASK_EXT:
            raise ValueError(f"manifest masks.member must be {MASK_EXT!r}, got {self.masks.get('member')!r}")
        if self.labelled is not None and self.label_ext is None:
            raise ValueError("manifest labelled describes partial labels, but label_ext is null (no labels)")

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def has_labels(self) -> bool:
        return self.label_ext is not None

    @property
    def has_masks(self) -> bool:
        """Whether samples of this set carry saliency masks (``{key}.mask.png``) for readers to use."""
        return self.masks is not None and int(self.masks.get("samples", 0)) > 0

    @property
    def partly_labelled(self) -> bool:
        """Whether some samples of this labelled set are stored unlabelled (label -1) on purpose."""
        return self.labelled is not None and int(self.labelled.get("unlabelled", 0)) > 0

    @property
    def labels(self) -> LabelRule:
        """How every reader of these shards reads a sample's class."""
        return LabelRule(self.label_ext, self.label_key, tuple(self.classes) if self.classes else None)

    def shard_url(self, i: int) -> str:
        if self.url is None:
            raise ValueError("manifest has no location; load it with load_manifest() or set .url")
        return storage.join(storage.dirname(self.url), self.shards[i].name)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("url")
        return json.dumps(d, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], url: str | None = None) -> Manifest:
        d = dict(d)
        version = d.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{url or 'manifest'}: format_version {version} is not supported (expected {FORMAT_VERSION})"
            )
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        d["rejected"] = [Rejected(**r) for r in d.get("rejected", [])]
        known = {f.name for f in dataclasses.fields(cls)} - {"url"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{url or 'manifest'}: unknown fields {sorted(unknown)}")
        return cls(**d, url=url)


def manifest_url(url: str) -> str:
    """Accept either the manifest's own URL or the directory holding it."""
    return url if url.endswith(".json") else storage.join(url, MANIFEST_NAME)


def load_manifest(url: str, options: dict[str, Any] | None = None) -> Manifest:
    """Read ``manifest.json`` (or ``<dir>/manifest.json``) from a local path or fsspec URL."""
    url = manifest_url(url)
    try:
        with storage.open_url(url, "rb", options) as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"no shard manifest at {url}: build shards with `relic shards build` "
            f"or index existing ones with `relic shards index`"
        ) from e
    return Manifest.from_dict(data, url=url)


def save_manifest(manifest: Manifest, url: str, options: dict[str, Any] | None = None) -> str:
    """Write ``manifest.json`` atomically (``storage.write_atomic``); returns its URL."""
    url = manifest_url(url)
    storage.write_atomic(url, manifest.to_json().encode(), options)
    manifest.url = url
    return url
