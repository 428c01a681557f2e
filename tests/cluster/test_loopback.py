"""The local Ray instance of ``cluster.trainer.ray_session`` listens on loopback only.

With a Ray task, an actor and a one-worker Ray Train run alive, every listening TCP socket of every
process of the instance (the driver, its descendants — GCS, raylet, agents, workers — and any process
whose command line names the instance's session directory) must be bound to 127.0.0.0/8 or ::1.

One exception, not Ray's: rank 0's ``torch.distributed.TCPStore`` (the rendezvous of the process group
Ray Train sets up at ``MASTER_PORT``) always listens on all interfaces — torch gives its server no bind
address, with libuv or without — so that one socket, and only it, is left out.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, or 127.x.y.z mapped into IPv6 (``::ffff:127.0.0.1``: an AF_INET6 socket that
    gRPC opened for the IPv4 address)."""
    ip = ipaddress.ip_address(host.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def instance_processes(session_dir: str) -> list[psutil.Process]:
    driver = psutil.Process()
    found = {p.pid: p for p in [driver, *driver.children(recursive=True)]}
    for p in psutil.process_iter(["cmdline"]):
        if any(session_dir in arg for arg in p.info["cmdline"] or ()):
            found.setdefault(p.pid, p)
    return list(found.values())


def listeners(processes: list[psutil.Process]) -> list[tuple[str, int, str, int]]:
    """(process, pid, address, port) of every listening TCP socket of ``processes``; the process is
    named by its title (``ray::IDLE``, ``ray::DashboardAgent``, ...) or its executable's name."""
    found = []
    for p in processes:
        try:
            name = Path((p.cmdline() or [p.name()])[0].strip()).name
            found += [
                (name, p.pid, c.laddr.ip, c.laddr.port)
                for c in p.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN
            ]
        except psutil.NoSuchProcess:  # a worker that exited meanwhile listens nowhere
            pass
    return found


@pytest.mark.timeout(180)
def test_local_instance_listens_on_loopback_only(tmp_path, monkeypatch):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.trainer import ray_session

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # The autoscaler monitor's and the dashboard head's metrics servers have fixed default ports
    # (44217, 44227); another Ray instance on this machine may hold them, and then they do not start.
    autoscaler_metrics, dashboard_metrics = free_ports(2)
    monkeypatch.setenv("AUTOSCALER_METRIC_PORT", str(autoscaler_metrics))
    monkeypatch.setenv("DASHBOARD_METRIC_PORT", str(dashboard_metrics))
    assert not ray.is_initialized()
    ready, done = tmp_path / "ready", tmp_path / "done"

    def wait_for_probe(config: dict) -> None:
        store = {"pid": os.getpid(), "port": int(os.environ["MASTER_PORT"])}
        Path(config["ready"] + ".tmp").write_text(json.dumps(store))
        os.replace(config["ready"] + ".tmp", config["ready"])
        deadline = time.monotonic() + 60
        while not Path(config["done"]).exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    @ray.remote
    def task_pid() -> int:
        return os.getpid()

    @ray.remote
    class Pid:
        def get(self) -> int:
            return os.getpid()

    with ray_session(num_cpus=2):
        session_dir = ray._private.worker._global_node.get_session_dir_path()
        actor = Pid.remote()
        ray.get([task_pid.remote(), actor.get.remote()])
        trainer = TorchTrainer(
            wait_for_probe,
            train_loop_config={"ready": str(ready), "done": str(done)},
            scaling_config=ScalingConfig(num_workers=1),
            run_config=RunConfig(name="loopback", storage_path=str(tmp_path / "runs")),
        )
        failure: list[BaseException] = []

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as e:
                failure.append(e)

        run = threading.Thread(target=fit)
        run.start()
        try:
            deadline = time.monotonic() + 90
            while not ready.exists() and run.is_alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert ready.exists(), f"the Ray Train worker did not start: {failure}"
            found = listeners(instance_processes(session_dir))
        finally:
            done.touch()
            run.join(timeout=60)
        ray.kill(actor)
    assert not failure, failure
    names = {name for name, *_ in found}
    assert {"gcs_server", "raylet", "ray::RayTrainWorker"} <= names, found
    assert {autoscaler_metrics, dashboard_metrics} <= {port for *_, port in found}, found
    store = json.loads(ready.read_text())
    outside = [
        f"{name} (pid {pid}) on {host}:{port}"
        for name, pid, host, port in found
        if not is_loopback(host) and (pid, port) != (store["pid"], store["port"])
    ]
    assert not outside, "listening beyond loopback:\n" + "\n".join(outside)
