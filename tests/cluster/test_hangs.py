"""Errors instead of hangs: a storage endpoint that accepts connections but never answers, and a worker
request larger than the Ray cluster, end within a bound with a message naming the key, the endpoint
and the numbers (issue 21, item 3).

The "black hole" is a TCP server on loopback that accepts every connection and never reads or writes:
what a wedged proxy, a half-dead load balancer or a firewall that drops replies looks like to botocore.
"""

from __future__ import annotations

import concurrent.futures
import logging
import pickle
import socket
import threading
import time
from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config
from commands import cli
from pipeline import storage

TINY = Path(__file__).with_name("tiny.yaml")

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def black_hole(monkeypatch):
    """``http://127.0.0.1:PORT`` of a server that accepts TCP connections and never answers. Dummy
    credentials in the environment, so that botocore does not look for real ones."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("RELIC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    server = socket.create_server(("127.0.0.1", 0), backlog=128)
    server.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, name="black-hole", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        server.close()


def test_doctor_storage_check_ends_within_its_timeout(black_hole, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    start = time.monotonic()
    rc = cli.main(["doctor", "--url", "s3://bucket/x", "--endpoint-url", black_hole, "--timeout", "5"])
    elapsed = time.monotonic() - start
    out = capsys.readouterr().out
    assert rc == 1
    line = next(ln for ln in out.splitlines() if ln.startswith("FAIL") and "storage" in ln)
    assert black_hole in line and "within 5 s" in line, line
    # the storage check is bounded by --timeout; the rest of the doctor (imports, a DALI decode) is not
    storage_check = doctor_storage_seconds(black_hole, 5)
    assert storage_check < 8, storage_check
    assert elapsed < 45, elapsed


def doctor_storage_seconds(endpoint: str, timeout: float) -> float:
    from commands import doctor

    start = time.monotonic()
    (check,) = doctor.check_storage("s3://bucket/x", endpoint, timeout)
    assert check.status == "FAIL"
    return time.monotonic() - start


def test_preflight_names_data_train_when_its_endpoint_never_answers(black_hole, tmp_path):
    from cluster.trainer import preflight

    cfg = load_config(
        TINY,
        [
            "data.train=s3://bucket/shards",
            f"data.endpoint_url={black_hole}",
            f"run.storage={tmp_path / 'runs'}",
            "run.network_timeout_s=5",
        ],
    )
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        preflight(cfg)
    assert time.monotonic() - start < 10
    assert info.value.key == "data.train"
    message = str(info.value)
    assert "s3://bucket/shards" in message and black_hole in message and "5 s" in message
    assert "run.network_timeout_s" in message
    assert not (tmp_path / "runs").exists()  # the data is checked before anything is written


def test_preflight_names_run_storage_when_its_endpoint_never_answers(black_hole, digits_shards):
    from cluster.trainer import preflight

    cfg = load_config(
        TINY,
        [
            f"data.train={digits_shards}",
            "run.storage=s3://bucket/runs",
            f"run.endpoint_url={black_hole}",
            "run.network_timeout_s=5",
        ],
    )
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        preflight(cfg)
    assert time.monotonic() - start < 10
    assert info.value.key == "run.storage"
    message = str(info.value)
    assert "s3://bucket/runs" in message and black_hole in message and "5 s" in message


def test_reading_a_shard_from_a_silent_endpoint_fails_within_the_request_bound(black_hole):
    url = "s3://bucket/shards/shard-000000.tar"
    options = storage.storage_options(url, endpoint_url=black_hole, config_kwargs={"read_timeout": 2})
    # user-given options win key by key; the rest of the defaults stay
    config = options["config_kwargs"]
    assert config["read_timeout"] == 2
    assert config["connect_timeout"] == storage.S3_CONFIG["connect_timeout"]
    assert config["retries"] == storage.S3_CONFIG["retries"]
    assert pickle.loads(pickle.dumps(options)) == options
    assert storage.redact(options) == options  # no secrets in there, nested dicts pass through
    start = time.monotonic()
    with pytest.raises(OSError, match=r"(?i)read timeout"), storage.open_stream(url, options) as f:
        f.read(512)
    # one request: at most S3_CONFIG's attempts x read_timeout, plus botocore's backoff (< 1 + 2 s)
    attempts = storage.S3_CONFIG["retries"]["total_max_attempts"]
    assert time.monotonic() - start < attempts * 2 + 6


def test_s3_defaults_bound_every_request():
    options = storage.storage_options("s3://bucket/x")
    config = options["config_kwargs"]
    assert 0 < config["connect_timeout"] <= 10 and 0 < config["read_timeout"] <= 30
    assert config["retries"]["mode"] == "standard" and config["retries"]["total_max_attempts"] <= 3
    fs, path = storage.filesystem("s3://bucket/x", options)
    assert path == "bucket/x" and fs.retries == 1  # s3fs's own loop would multiply botocore's attempts
    assert pickle.loads(pickle.dumps(fs)).retries == 1  # Ray ships the run storage's filesystem
    assert storage.storage_options("/local/path") == {}


@pytest.fixture
def ray_two_cpus():
    import ray

    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.ray
def test_more_workers_than_a_local_instance_has_fails_at_once(ray_two_cpus, digits_shards, tmp_path):
    import ray

    from cluster.trainer import fit

    cfg = load_config(
        TINY, [f"data.train={digits_shards}", f"run.storage={tmp_path / 'runs'}", "scaling.num_workers=4"]
    )
    before = len(ray._private.state.actors())
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        fit(cfg, progress=False)
    assert time.monotonic() - start < 30
    assert info.value.key == "scaling.num_workers"
    message = str(info.value)
    assert "4 workers x 1 CPU" in message and "4 CPU" in message and "has 2 CPU" in message, message
    assert len(ray._private.state.actors()) == before


@pytest.mark.ray
def test_a_joined_cluster_is_waited_for_with_a_limit(caplog):
    """A cluster this process joined may grow: the wait says what it waits for, ends when a node joins,
    and stops after scaling.resource_wait_s with the numbers otherwise."""
    import ray
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    from cluster.trainer import wait_for_resources

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # keep the nodes' loopback addresses (test_ray_multinode)
    one_cpu = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**one_cpu, "include_dashboard": False})
    try:
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
        try:
            two_workers = ["data.train=/x", "scaling.num_workers=2", "scaling.cpus_per_worker=1"]
            start = time.monotonic()
            with caplog.at_level(logging.WARNING, "cluster.trainer"), pytest.raises(ConfigError) as info:
                wait_for_resources(load_config(TINY, [*two_workers, "scaling.resource_wait_s=3"]))
            assert 3 <= time.monotonic() - start < 15
            assert info.value.key == "scaling.num_workers"
            message = str(info.value)
            assert "2 workers x 1 CPU" in message and "has 1 CPU" in message and "waited 3 s" in message
            assert any("nodes to join" in r.getMessage() for r in caplog.records), caplog.text

            with concurrent.futures.ThreadPoolExecutor(1) as pool:  # Ray adds nodes from the main thread only
                waiting = pool.submit(
                    wait_for_resources, load_config(TINY, [*two_workers, "scaling.resource_wait_s=45"])
                )
                time.sleep(2)
                assert not waiting.done()
                cluster.add_node(**one_cpu)
                waiting.result(timeout=40)  # returns, no ConfigError
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = saved
