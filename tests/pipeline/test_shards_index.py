"""Foreign shards (webdataset.ShardWriter, GNU tar) indexed by `relic shards index` and read like ours;
`verify` catches damage; `inspect` summarises."""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import pytest
import webdataset as wds
from shards_helpers import image_bytes, read_dali

from commands.shards import add_arguments
from commands.shards import run as cli_run
from pipeline.shards.index import ShardIndexError, index_shards
from pipeline.shards.manifest import load_manifest
from pipeline.shards.verify import verify_shards


def cli(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return cli_run(parser.parse_args([str(a) for a in argv]))


def write_shardwriter_set(root, n=23, per_shard=10, label="cls"):
    """Shards as a webdataset user writes them; returns [(key, png bytes, label)]."""
    samples = []
    with wds.ShardWriter(str(root / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            png = image_bytes("PNG", seed=i)
            sample = {"__key__": f"s{i:04d}", "png": png}
            if label == "cls":
                sample["cls"] = str(i % 4).encode()
            else:
                sample["json"] = json.dumps({"target": i % 4, "caption": "x"}).encode()
            sink.write(sample)
            samples.append((f"s{i:04d}", png, i % 4))
    return samples


@pytest.mark.parametrize("label", ["cls", "json"])
def test_shardwriter_shards_indexed_and_read_by_dali(tmp_path, label):
    samples = write_shardwriter_set(tmp_path, label=label)
    m = index_shards(str(tmp_path / "train-{000000..000002}.tar"), write_idx=True, progress=False)
    assert [s.samples for s in m.shards] == [10, 10, 3]
    assert m.image_ext == "png"
    assert (m.label_ext, m.label_key) == (("cls", None) if label == "cls" else ("json", "target"))
    assert m.class_counts == {"0": 6, "1": 6, "2": 6, "3": 5}
    assert load_manifest(str(tmp_path)).to_json() == m.to_json()
    idxs = [str(tmp_path / s.index) for s in m.shards]
    tars = [m.shard_url(i) for i in range(len(m.shards))]
    got = read_dali(tars, idxs, exts=("png", label), label_key=m.label_key)
    assert got == [(png, lab) for _, png, lab in samples]
    assert verify_shards(str(tmp_path), decode=True) == []


def test_gnu_tar_shards_from_a_directory_and_list_file(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    expected = []
    for i in range(7):
        jpg = image_bytes("JPEG", seed=i)
        (files / f"k{i}.jpeg").write_bytes(jpg)
        (files / f"k{i}.cls").write_text(f"{i % 2}\n")
        expected.append((jpg, i % 2))
    shards = tmp_path / "shards"
    shards.mkdir()
    members = [f"k{i}.{e}" for i in range(7) for e in ("jpeg", "cls")]
    subprocess.run(["tar", "-cf", str(shards / "a.tar"), "-C", str(files), *members[:8]], check=True)
    subprocess.run(["tar", "-cf", str(shards / "b.tar"), "-C", str(files), *members[8:]], check=True)
    m = index_shards(str(shards), write_idx=True, progress=False)
    assert [s.name for s in m.shards] == ["a.tar", "b.tar"] and m.total_samples == 7
    assert (m.image_ext, m.label_ext) == ("jpeg", "cls")
    got = read_dali(
        [m.shard_url(0), m.shard_url(1)], [str(shards / s.index) for s in m.shards], exts=("jpeg", "cls")
    )
    assert got == expected
    # the same shards named in a list file
    (tmp_path / "list.txt").write_text("shards/a.tar\nshards/b.tar\n")
    again = index_shards(str(tmp_path / "list.txt"), str(tmp_path), progress=False)
    assert [s.name for s in again.shards] == ["shards/a.tar", "shards/b.tar"]
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in m.shards]
    assert verify_shards(str(tmp_path)) == []


def test_index_errors_name_the_problem(tmp_path):
    with pytest.raises(ShardIndexError, match="does not exist"):
        index_shards(str(tmp_path / "none"))
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ShardIndexError, match=r"bad\.tar"):
        index_shards(str(tmp_path / "bad.tar"))


def test_verify_and_cli_report_damage_by_shard(digits_shards, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(digits_shards, copy)
    assert cli("verify", copy, "--decode") == 0
    m = load_manifest(str(copy))
    data = bytearray((copy / m.shards[2].name).read_bytes())
    data[600] ^= 0xFF  # inside the first image's bytes
    (copy / m.shards[2].name).write_bytes(bytes(data))
    os.unlink(copy / m.shards[4].name)
    (copy / m.shards[1].index).write_text("v1.2 1\njpg 0 0 x.jpg\n")
    problems = verify_shards(str(copy))
    assert {p.shard for p in problems} == {m.shards[1].name, m.shards[2].name, m.shards[4].name}
    assert any("sha256" in p.message for p in problems if p.shard == m.shards[2].name)
    assert any("missing" in p.message for p in problems if p.shard == m.shards[4].name)
    assert any("index file" in p.message for p in problems if p.shard == m.shards[1].name)
    capsys.readouterr()
    assert cli("verify", copy) == 1
    assert m.shards[2].name in capsys.readouterr().err


def test_cli_build_inspect_and_errors(tmp_path, capsys):
    src = tmp_path / "src" / "only"
    src.mkdir(parents=True)
    (src / "a.jpg").write_bytes(image_bytes("JPEG"))
    (src / "broken.jpg").write_bytes(b"")
    assert cli("build", tmp_path / "src", tmp_path / "out", "--index", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "wrote 1 samples in 1 shards" in out and "rejected 1 inputs" in out and "empty file" in out
    assert cli("inspect", tmp_path / "out") == 0
    text = capsys.readouterr().out
    assert "only" in text and "first keys: 00000000" in text
    assert cli("build", tmp_path / "missing", tmp_path / "out2") == 2
    assert "SOURCE" in capsys.readouterr().err and not (tmp_path / "out2" / "manifest.json").exists()
