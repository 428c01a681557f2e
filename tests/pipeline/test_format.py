"""The one owner of the shard format (pipeline/shards/format.py) and every reader that uses it: the key
rule against webdataset's, labels against a naive table, and foreign shards (GNU tar with dotted
folders and ``./`` names, members out of order, gzip, a truncated shard) through index, verify,
inspect, the training reader and evaluation."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import subprocess
import tarfile

import pytest
import webdataset as wds
from shards_helpers import image_bytes
from webdataset.tariterators import base_plus_ext

from commands.shards import add_arguments
from commands.shards import run as cli_run
from pipeline.labelled import load_labelled_images
from pipeline.reader import ShardReader
from pipeline.shards.format import LabelRule, NonAdjacentMembers, samples, split_key, tar_members
from pipeline.shards.index import ShardIndexError, index_shards
from pipeline.shards.inspect import inspect_shards
from pipeline.shards.manifest import load_manifest
from pipeline.shards.verify import verify_shards


def cli(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return cli_run(parser.parse_args([str(a) for a in argv]))


@pytest.mark.parametrize(
    "name",
    [
        "a.b/c.d.jpg",
        "./000001.jpg",
        "dir.v2/sub/k.JPG",
        "k.tar.gz",
        "x/__meta__.json",
        "plain.cls",
        "a/b/c.json",
    ],
)
def test_key_rule_is_webdatasets(name):
    key, ext = base_plus_ext(name)
    assert split_key(name) == (key, ext.lower())


@pytest.mark.parametrize("name", ["README", "dir/.hidden", "__key__", "__meta__/x.jpg"])
def test_names_that_are_not_sample_data(name):
    assert split_key(name) is None


LABEL_CASES = [
    # (rule, parts, expected index): a naive table, written out by hand
    (LabelRule("cls"), {"cls": b"3\n"}, 3),
    (LabelRule("cls"), {"cls": b"-1"}, -1),
    (LabelRule("cls"), {"cls": b"-2"}, None),
    (LabelRule("cls"), {"cls": b"x"}, None),
    (LabelRule("cls", classes=("cat", "dog")), {"cls": b"dog"}, 1),
    (LabelRule("cls", classes=("cat", "dog")), {"cls": b"2"}, None),  # out of range
    (LabelRule("cls"), {}, None),
    (LabelRule("json"), {"json": json.dumps({"label": 4}).encode()}, 4),
    (LabelRule("json"), {"json": json.dumps({"cls": "7"}).encode()}, 7),
    (LabelRule("json"), {"json": json.dumps({"target": 2}).encode()}, 2),
    (LabelRule("json", "y"), {"json": json.dumps({"label": 1, "y": 5}).encode()}, 5),
    (LabelRule("json", classes=("cat", "dog")), {"json": json.dumps({"label": "cat"}).encode()}, 0),
    (LabelRule("json", classes=("cat", "dog")), {"json": json.dumps({"label": "cow"}).encode()}, None),
    (LabelRule("json"), {"json": json.dumps({"label": True}).encode()}, None),
    (LabelRule("json"), {"json": b"{broken"}, None),
    (LabelRule("json"), {"json": json.dumps({"caption": "x"}).encode()}, None),
    (LabelRule(), {"cls": b"3"}, -1),  # an unlabelled set
]


@pytest.mark.parametrize(("rule", "parts", "expected"), LABEL_CASES)
def test_label_rule(rule, parts, expected):
    assert rule.parse(parts) == expected


def _write(path, members) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_gnu_tar_with_dotted_folders_and_dot_slash_names_is_read_whole_everywhere(tmp_path):
    """37 samples made with GNU tar, in folders with dots and with ``./`` prefixes: index, reader and
    evaluation all see 37 (a key split at the first dot of the path saw 26)."""
    src = tmp_path / "src"
    expected = {}
    for i in range(37):
        folder = src / ("v1.2" if i % 2 else "set.b") / f"n{i % 3}.x"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:02d}.jpg").write_bytes(image_bytes("JPEG", seed=i))
        (folder / f"img{i:02d}.cls").write_text(str(i % 5))
        expected[f"img{i:02d}"] = i % 5
    names = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    shards = tmp_path / "shards"
    shards.mkdir()
    half = len(names) // 2 + 1  # an even split keeps each sample's two members in one shard
    subprocess.run(
        ["tar", "-cf", str(shards / "a.tar"), "-C", str(src), *[f"./{n}" for n in names[:half]]], check=True
    )
    subprocess.run(["tar", "-cf", str(shards / "b.tar"), "-C", str(src), *names[half:]], check=True)

    m = index_shards(str(shards), progress=False)
    assert m.total_samples == 37 and (m.image_ext, m.label_ext) == ("jpg", "cls")
    assert verify_shards(str(shards), decode=True) == []
    x, y = load_labelled_images(str(shards))
    assert x.shape[0] == len(y) == 37 and sorted(y.tolist()) == sorted(expected.values())
    reader = ShardReader(str(shards), batch_size=37, shuffle_buffer=1)
    (batch,) = list(reader.epoch(0))
    assert {k.rsplit("/", 1)[-1]: lab for k, lab in zip(batch.keys, batch.labels.tolist())} == expected
    # webdataset groups them the same way
    grouped = list(wds.WebDataset([m.shard_url(0), m.shard_url(1)], shardshuffle=False, empty_check=False))
    assert sorted(s["__key__"] for s in grouped) == sorted(batch.keys)


def test_members_out_of_order_are_refused_naming_the_shard_and_the_fix(tmp_path, capsys):
    """``tar cf`` of a directory lists files in directory order: a sample's .jpg and .cls apart."""
    good = [
        (f"g{i}.{e}", image_bytes("JPEG", seed=i) if e == "jpg" else b"1")
        for i in range(4)
        for e in ("jpg", "cls")
    ]
    _write(tmp_path / "good.tar", good)
    scattered = [(f"s{i}.jpg", image_bytes("JPEG", seed=i)) for i in range(4)] + [
        (f"s{i}.cls", b"0") for i in range(4)
    ]
    _write(tmp_path / "scattered.tar", scattered)
    with (
        open(tmp_path / "scattered.tar", "rb") as f,
        pytest.raises(NonAdjacentMembers, match=r"s0.*--sort=name"),
    ):
        list(samples(tar_members(f)))

    m = index_shards(str(tmp_path), progress=False)
    assert [s.name for s in m.shards] == ["good.tar"] and m.label_ext == "cls"
    (bad,) = [r for r in m.rejected if "scattered.tar" in r.input]
    assert "not adjacent" in bad.reason and "tar --sort=name" in bad.reason
    with pytest.raises(ShardIndexError, match=r"scattered\.tar.*--sort=name"):
        index_shards(str(tmp_path), progress=False, strict=True)
    assert cli("index", tmp_path, "--no-progress") == 0
    out = capsys.readouterr().out
    assert "scattered.tar" in out and "--sort=name" in out
    assert cli("index", tmp_path, "--strict", "--no-progress") == 2


def test_gzipped_shards_are_indexed_verified_and_inspected(tmp_path):
    """A folder of .tar.gz shards (the reader has always read them) is indexed whole, not skipped."""
    for s in range(3):
        members = [(f"k{s}{i}.{e}", image_bytes("JPEG", seed=10 * s + i) if e == "jpg" else str(i % 2).encode())
                   for i in range(10) for e in ("jpg", "cls")]  # fmt: skip
        raw = tmp_path / "plain.tar"
        _write(raw, members)
        (tmp_path / f"part-{s}.tar.gz").write_bytes(gzip.compress(raw.read_bytes()))
        raw.unlink()
    m = index_shards(str(tmp_path), write_idx=True, progress=False)
    assert m.total_samples == 30 and [s.samples for s in m.shards] == [10, 10, 10]
    assert all(s.index is None for s in m.shards)  # DALI reads no compressed tars
    assert verify_shards(str(tmp_path), decode=True) == []
    assert "first keys: k00, k01" in inspect_shards(str(tmp_path))
    one = tmp_path / "one"
    one.mkdir()
    (one / "part-1.tar.gz").write_bytes((tmp_path / "part-1.tar.gz").read_bytes())
    single = index_shards(str(one / "part-1.tar.gz"), progress=False)  # named directly
    assert single.total_samples == 10 and verify_shards(str(one)) == []
    keys = [k for b in ShardReader(str(tmp_path), batch_size=10).epoch(0) for k in b.keys]
    assert sorted(keys) == sorted(f"k{s}{i}" for s in range(3) for i in range(10))


def test_a_truncated_shard_is_left_out_and_listed_not_fatal(tmp_path, capsys):
    for s in range(3):
        _write(tmp_path / f"p{s}.tar", [(f"k{s}{i}.jpg", image_bytes("JPEG", seed=i)) for i in range(6)])
    with tarfile.open(tmp_path / "p1.tar") as tar:
        cut = tar.getmembers()[3].offset_data + 100  # inside the fourth image
    data = (tmp_path / "p1.tar").read_bytes()
    (tmp_path / "p1.tar").write_bytes(data[:cut])
    m = index_shards(str(tmp_path), progress=False)
    assert [s.name for s in m.shards] == ["p0.tar", "p2.tar"] and m.total_samples == 12
    (bad,) = m.rejected
    assert bad.input.endswith("p1.tar") and "shard left out" in bad.reason
    with pytest.raises(ShardIndexError, match=r"p1\.tar"):
        index_shards(str(tmp_path), progress=False, strict=True)
    assert verify_shards(str(tmp_path)) == []
    assert cli("index", tmp_path, "--no-progress") == 0
    assert "p1.tar" in capsys.readouterr().out


def test_class_name_labels_in_json_without_a_label_key_train_and_verify(tmp_path):
    """One label rule: the set the reader trains on is the set verify accepts."""
    names = ["zebra", "ant", "moth"]
    members = []
    for i in range(12):
        members.append((f"{i:03d}.png", image_bytes("PNG", seed=i)))
        members.append((f"{i:03d}.json", json.dumps({"label": names[i % 3], "w": 1}).encode()))
    _write(tmp_path / "a.tar", members)
    m = index_shards(str(tmp_path), progress=False)
    assert (m.label_ext, m.label_key, m.classes) == ("json", "label", ["ant", "moth", "zebra"])
    assert m.class_counts == {"ant": 4, "moth": 4, "zebra": 4}
    assert verify_shards(str(tmp_path), decode=True) == []
    (batch,) = list(ShardReader(str(tmp_path), batch_size=12, shuffle_buffer=1).epoch(0))
    assert [m.classes[label] for label in batch.labels.tolist()] == [names[int(k) % 3] for k in batch.keys]
    assert load_manifest(str(tmp_path)).labels.classes == ("ant", "moth", "zebra")
