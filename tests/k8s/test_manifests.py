"""KubeRay manifests (``k8s/``) and the image (``deploy/Dockerfile``), checked without a cluster.

* Schema: each manifest against the v1 ``openAPIV3Schema`` of its KubeRay CRD (copied into ``schemas/`` by
  ``update_schemas.py``), made strict: an unknown field is an error, as with ``kubectl apply``'s server-side
  strict field validation (a bare CRD schema would silently accept and prune a misspelt key).
* Semantics: what the schema cannot say — head runs no tasks, a GPU worker group scaling from 0, autoscaler v2,
  token auth on every container, the shared run-dir PVC, the RayJob entrypoint's config, one Ray version.
* ``serveConfigV2`` equals ``serve build`` output up to the differences documented in the manifest.
* The Dockerfile installs what the README quick start installs.

No Ray cluster is started (``serve build`` only imports the application).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stdout
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"

MANIFESTS = {"raycluster": "raycluster.yaml", "rayjob": "rayjob-pipeline.yaml",
             "rayservice": "rayservice-classifier.yaml"}
KINDS = {"raycluster": "RayCluster", "rayjob": "RayJob", "rayservice": "RayService"}
# KubeRay: RayCluster names <= 53 chars; RayJob/RayService names get 6 characters appended for their cluster.
MAX_NAME = {"raycluster": 53, "rayjob": 47, "rayservice": 47}

SECRET = "raydebias-ray-auth"
TOKEN_KEY = "auth_token"  # the key KubeRay's operator reads from authOptions.secretName
PVC = "raydebias-runs"
RUNS = "/mnt/runs"
IMAGE = f"ghcr.io/raydebias/raydebias:{version('raydebias')}-gpu"

# The differences between `serve build` output and the manifest's serveConfigV2 (documented in its header).
SERVE_APP_NAME = "raydebias"
SERVE_IMPORT_PATH = "raydebias.serve.app:build"
SERVE_HTTP_HOST = "0.0.0.0"
SERVE_REQUEST_TIMEOUT_S = 30


# --------------------------------------------------------------------------------------------- helpers


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def manifest(kind: str) -> dict:
    return load_yaml(K8S / MANIFESTS[kind])


def strict(schema: Any) -> Any:
    """A CRD ``openAPIV3Schema`` as a strict JSON schema.

    * every object schema with ``properties`` and neither ``additionalProperties`` nor
      ``x-kubernetes-preserve-unknown-fields`` gets ``additionalProperties: false`` (unknown fields → errors);
    * ``x-kubernetes-int-or-string`` accepts an integer or a string (controller-gen already spells it as
      ``anyOf``; a bare marker gets one).
    Recurses through the schema keywords only, so a field that happens to be called ``properties`` or
    ``type`` is never mistaken for a keyword.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
    for key in ("items", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def raw_schema(kind: str) -> dict:
    return json.loads((SCHEMAS / f"{kind}.v1.json").read_text())


@lru_cache(maxsize=None)
def validator(kind: str, strict_mode: bool = True) -> jsonschema.Draft4Validator:
    schema = strict(raw_schema(kind)) if strict_mode else raw_schema(kind)
    return jsonschema.Draft4Validator(schema)


def schema_errors(kind: str, doc: dict, strict_mode: bool = True) -> list[str]:
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in validator(kind, strict_mode).iter_errors(doc))


def cluster_spec(kind: str, doc: dict) -> dict:
    """The RayCluster spec inside each kind (RayService calls it rayClusterConfig, RayJob rayClusterSpec)."""
    return {"raycluster": lambda s: s, "rayjob": lambda s: s["rayClusterSpec"],
            "rayservice": lambda s: s["rayClusterConfig"]}[kind](doc["spec"])


def pod_specs(spec: dict) -> Iterator[tuple[str, dict]]:
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"worker:{group['groupName']}", group["template"]["spec"]


def all_containers(kind: str, doc: dict) -> Iterator[tuple[str, dict]]:
    """Every container the manifest defines or configures: head, workers, the autoscaler sidecar (its env comes
    from autoscalerOptions), the RayJob submitter."""
    spec = cluster_spec(kind, doc)
    for role, pod in pod_specs(spec):
        for c in pod.get("initContainers", []) + pod["containers"]:
            yield f"{role}/{c['name']}", c
    if spec.get("enableInTreeAutoscaling"):
        yield "head/autoscaler", {"name": "autoscaler", **spec.get("autoscalerOptions", {})}
    if kind == "rayjob" and doc["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode":
        template = doc["spec"].get("submitterPodTemplate")
        assert template, "K8sJobMode submitter pod needs the auth token: give a submitterPodTemplate"
        for c in template["spec"]["containers"]:
            yield f"submitter/{c['name']}", c


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def gpus(resources: dict, key: str = "limits") -> int:
    return int(str(resources.get(key, {}).get("nvidia.com/gpu", 0)))


def run_argv(argv: list[str]) -> tuple[str, str | None, list[str]]:
    """``raydebias run`` arguments → (config, run_dir, overrides), with the CLI's own option names."""
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("config")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args(argv)
    return a.config, a.run_dir, a.overrides


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        instr, _, rest = buf.strip().partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    return out


def docker_args() -> dict[str, str]:
    return dict(a.partition("=")[::2] for i, a in dockerfile() if i == "ARG" and "=" in a)


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], text)


def local_package_installs(command: str) -> list[tuple[bool, frozenset[str]]]:
    """Every ``pip install`` of the local package (``.`` / ``.[extras]``) in a shell command:
    (editable, extras)."""
    found = []
    tokens = shlex.split(command)
    segments, seg = [], []
    for t in tokens + ["&&"]:
        if t in ("&&", "||", ";", "|"):
            segments.append(seg)
            seg = []
        else:
            seg.append(t)
    for seg in segments:
        if "pip" not in seg and not any(t.endswith("/pip") for t in seg):
            continue
        if "install" not in seg:
            continue
        args = seg[seg.index("install") + 1:]
        for i, arg in enumerate(args):
            m = re.fullmatch(r"\.(?:\[([^\]]*)\])?", arg)
            if m:
                extras = frozenset(x.strip() for x in (m.group(1) or "").split(",") if x.strip())
                editable = i > 0 and args[i - 1] in ("-e", "--editable")
                found.append((editable, extras))
    return found


# --------------------------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_schema_copies_are_compact_v1_crd_schemas(kind):
    text = (SCHEMAS / f"{kind}.v1.json").read_text()
    assert len(text.splitlines()) == 1, "keep the schema copies compact (one line of JSON)"
    schema = raw_schema(kind)
    assert {"apiVersion", "kind", "metadata", "spec", "status"} <= set(schema["properties"])
    assert (SCHEMAS / "SOURCE.txt").read_text().strip(), "record which KubeRay commit the schemas came from"


def test_strict_helper():
    schema = strict({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "open": {"type": "object", "properties": {"a": {"type": "string"}},
                     "x-kubernetes-preserve-unknown-fields": True},
            "port": {"x-kubernetes-int-or-string": True},
            "items": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer"}}}},
            "properties": {"type": "object", "properties": {"type": {"type": "string"}}},
        },
    })
    v = jsonschema.Draft4Validator(schema)
    ok = {"name": "a", "labels": {"k": "v"}, "open": {"a": "x", "anything": 1}, "port": 8080,
          "items": [{"x": 1}], "properties": {"type": "t"}}
    assert list(v.iter_errors(ok)) == []
    assert v.is_valid({**ok, "port": "http"})
    for bad in ({**ok, "nmae": "a"},                       # unknown top-level field
                {**ok, "items": [{"x": 1, "y": 2}]},       # unknown field inside an array item
                {**ok, "properties": {"typo": "t"}},       # a field called `properties` is a field
                {**ok, "labels": {"k": 1}},                # map values keep their type
                {**ok, "port": 1.5}, {**ok, "port": [80]}):  # int-or-string: nothing else
        assert not v.is_valid(bad), bad


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_matches_crd_schema_strictly(kind):
    doc = manifest(kind)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == KINDS[kind]
    assert schema_errors(kind, doc) == []


def test_misspelt_field_is_rejected():
    doc = manifest("rayjob")
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]
    head["rayStartParms"] = head.pop("rayStartParams")
    errors = schema_errors("rayjob", doc)
    assert any("spec.rayClusterSpec.headGroupSpec" in e and "rayStartParms" in e for e in errors), errors
    # the bare CRD schema accepts it (the API server would prune it): the strictness is what catches it
    assert schema_errors("rayjob", doc, strict_mode=False) == []


@pytest.mark.parametrize("kind, path, value", [
    ("rayjob", "spec.shutdownAfterJobFinishes", "true"),
    ("rayjob", "spec.ttlSecondsAfterFinished", "600"),
    ("rayjob", "spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas", "4"),
    ("raycluster", "spec.headGroupSpec.rayStartParams.num-cpus", 0),  # rayStartParams values are strings
    ("raycluster", "spec.enableInTreeAutoscaling", "yes"),
    ("rayservice", "spec.serveConfigV2", {"applications": []}),        # a YAML *string*, not a mapping
    ("rayservice", "spec.rayClusterConfig.autoscalerOptions.version", "v3"),
    ("raycluster", "spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.nvidia.com/gpu", [1]),
])
def test_wrong_type_is_rejected(kind, path, value):
    doc = manifest(kind)
    *parents, last = path.replace("nvidia.com/gpu", "nvidia\0com/gpu").split(".")
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last.replace("\0", ".")] = value
    assert schema_errors(kind, doc), f"{path}={value!r} should be a schema error"


def test_int_or_string_quantities_accept_both():
    for value in (1, "1"):
        doc = manifest("raycluster")
        doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"][
            "nvidia.com/gpu"] = value
        assert schema_errors("raycluster", doc) == []


# --------------------------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_names_are_valid_for_kuberay(kind):
    name = manifest(kind)["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= MAX_NAME[kind], name


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_one_ray_version_everywhere(kind):
    ray_version = docker_args()["RAY_VERSION"]
    assert cluster_spec(kind, manifest(kind))["rayVersion"] == ray_version
    # serveConfigV2 is compared with the local `serve build`: the local Ray must be the cluster's Ray
    assert version("ray") == ray_version


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_images_are_the_raydebias_image(kind):
    for where, c in all_containers(kind, manifest(kind)):
        if where != "head/autoscaler" or "image" in c:  # the autoscaler defaults to the head's image
            assert c["image"] == IMAGE, where


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_head_runs_no_tasks_and_serves_dashboard_in_cluster(kind):
    spec = cluster_spec(kind, manifest(kind))
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert not head.get("resources"), "KubeRay rejects group resources together with rayStartParams num-cpus"
    assert all(gpus(c.get("resources", {})) == 0 for c in head["template"]["spec"]["containers"])


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_gpu_worker_group_scales_from_zero(kind):
    groups = cluster_spec(kind, manifest(kind))["workerGroupSpecs"]
    gpu_groups = [g for g in groups if gpus(g["template"]["spec"]["containers"][0]["resources"]) >= 1]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for g in gpu_groups:
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert gpus(res) == 1
        assert "nvidia.com/gpu" not in res.get("requests", {}) or gpus(res, "requests") == gpus(res)
        assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0
        assert g["maxReplicas"] >= 1


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_autoscaler_v2(kind):
    spec = cluster_spec(kind, manifest(kind))
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    head_env = env_of(spec["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert "RAY_enable_autoscaler_v2" not in head_env, "KubeRay rejects the env var together with version: v2"
    for role, pod in pod_specs(spec):
        assert pod.get("restartPolicy", "Never") == "Never", f"{role}: autoscaler v2 needs restartPolicy Never"


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_token_auth_on_every_container(kind):
    doc = manifest(kind)
    assert cluster_spec(kind, doc)["authOptions"] == {"mode": "token", "secretName": SECRET}
    containers = dict(all_containers(kind, doc))
    assert "head/autoscaler" in containers and any(w.startswith("worker:") for w in containers)
    for where, c in containers.items():
        env = env_of(c)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
        token = env.get("RAY_AUTH_TOKEN", {})
        assert "value" not in token, f"{where}: a literal token in a manifest"
        assert token.get("valueFrom", {}).get("secretKeyRef") == {"name": SECRET, "key": TOKEN_KEY}, where


def test_secret_template_is_a_placeholder_and_not_applied():
    secret = load_yaml(K8S / "ray-auth-secret.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == SECRET
    assert set(secret["stringData"]) == {TOKEN_KEY}
    assert secret["stringData"][TOKEN_KEY].startswith("REPLACE-ME"), "never commit a real token"
    assert "ray-auth-secret.yaml" not in load_yaml(K8S / "kustomization.yaml")["resources"]


def test_kustomization_lists_existing_manifests():
    resources = load_yaml(K8S / "kustomization.yaml")["resources"]
    assert set(MANIFESTS.values()) | {"runs-pvc.yaml", "networkpolicy.yaml"} == set(resources)
    for r in resources:
        assert (K8S / r).is_file() and load_yaml(K8S / r)["metadata"]["name"]


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_run_dir_volume_on_head_and_workers(kind):
    pvc = load_yaml(K8S / "runs-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == PVC
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "head and workers sit on different nodes"
    spec = cluster_spec(kind, manifest(kind))
    roles = []
    for role, pod in pod_specs(spec):
        (vol,) = [v["name"] for v in pod.get("volumes", [])
                  if v.get("persistentVolumeClaim", {}).get("claimName") == PVC] or [None]
        assert vol, f"{role}: no volume for PVC {PVC}"
        mounts = [m for m in pod["containers"][0].get("volumeMounts", []) if m["name"] == vol]
        assert [m["mountPath"] for m in mounts] == [RUNS], role
        if kind != "rayservice":  # the pipeline writes run_dir; the service may only read it
            assert not mounts[0].get("readOnly"), f"{role}: the run dir must be writable"
        roles.append(role.split(":")[0])
    assert {"head", "worker"} <= set(roles)


def test_rayjob_entrypoint_runs_a_shipped_config():
    doc = manifest("rayjob")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["raydebias", "run"]
    config, run_dir, overrides = run_argv(argv[2:])
    path = ROOT / config  # the image's WORKDIR is the repo (checked in test_dockerfile_copies_the_repo)
    assert path.is_file(), f"{config} does not exist in the repo"
    assert path.resolve().is_relative_to(ROOT / "raydebias" / "configs"), "ship the config inside the package"
    assert run_dir and run_dir.startswith(RUNS + "/"), "run_dir must be on the shared PVC"
    from raydebias.cli import main

    out = io.StringIO()
    with redirect_stdout(out):  # the CLI's own --set parsing and config validation
        assert main(["validate", str(path), "--set", f"run_dir={run_dir}",
                     *[a for o in overrides for a in ("--set", o)]]) == 0
    resolved = yaml.safe_load(out.getvalue())
    assert resolved["run_dir"] == run_dir
    assert resolved["ray"]["address"] is None, "the driver must join the RayJob's cluster through $RAY_ADDRESS"
    per_worker = resolved["ray"]["num_gpus_per_worker"]
    worker_gpus = max(gpus(g["template"]["spec"]["containers"][0]["resources"])
                      for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert 0 < per_worker <= worker_gpus, "train workers should use the GPU workers' GPUs"


def test_rayjob_lifecycle():
    spec = manifest("rayjob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    workdir = [a for i, a in dockerfile() if i == "WORKDIR"][-1]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head.get("workingDir", workdir) == workdir, "the entrypoint's relative config path needs the WORKDIR"


# --------------------------------------------------------------------------------------------- serve


def serve_config() -> dict:
    return yaml.safe_load(manifest("rayservice")["spec"]["serveConfigV2"])


def test_serve_args_are_valid_serve_args():
    from raydebias.serve.app import ServeArgs

    (app,) = serve_config()["applications"]
    args = ServeArgs(**app["args"])  # extra="forbid": a misspelt key fails here
    assert args.run_dir.startswith(RUNS + "/")
    _, job_run_dir, _ = run_argv(shlex.split(manifest("rayjob")["spec"]["entrypoint"])[2:])
    assert args.run_dir == job_run_dir, "serve the run the RayJob writes"
    workers = cluster_spec("rayservice", manifest("rayservice"))["workerGroupSpecs"]
    assert 0 < args.num_gpus <= max(gpus(g["template"]["spec"]["containers"][0]["resources"]) for g in workers)
    with pytest.raises(ValueError):
        ServeArgs(**app["args"], rundir="/typo")


def test_serve_config_is_serve_build_output(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    cfg = serve_config()
    ServeDeploySchema.model_validate(cfg)
    (app,) = cfg["applications"]
    assert app["import_path"] == SERVE_IMPORT_PATH and app["name"] == SERVE_APP_NAME
    assert cfg["http_options"]["host"] == SERVE_HTTP_HOST

    # `serve build` takes an Application, not a builder: build one with the manifest's args.
    module = "_raydebias_k8s_serve_target"
    (tmp_path / f"{module}.py").write_text(
        f"import json\nfrom raydebias.serve.app import build\napp = build(json.loads({json.dumps(app['args'])!r}))\n")
    serve = Path(sys.executable).parent / "serve"
    assert serve.exists(), f"no `serve` CLI next to {sys.executable}"
    out = tmp_path / "serve_build.yaml"
    proc = subprocess.run([str(serve), "build", f"{module}:app", "--app-dir", str(tmp_path), "-o", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = yaml.safe_load(out.read_text())

    expected = copy.deepcopy(built)
    (exp_app,) = expected["applications"]
    assert exp_app["import_path"] == f"{module}:app"
    exp_app.update(name=SERVE_APP_NAME, import_path=SERVE_IMPORT_PATH, args=app["args"])
    expected["http_options"]["host"] = SERVE_HTTP_HOST
    expected["http_options"]["request_timeout_s"] = SERVE_REQUEST_TIMEOUT_S
    assert cfg == expected

    header = (K8S / "rayservice-classifier.yaml").read_text().split("apiVersion:")[0]
    for documented in ("applications[0].name", "applications[0].import_path", "applications[0].args",
                       "http_options.host", "http_options.request_timeout_s", "127.0.0.1"):
        assert documented in header, f"difference {documented!r} is not documented in the manifest header"


def test_serve_port_is_a_container_port():
    port = serve_config()["http_options"]["port"]
    spec = cluster_spec("rayservice", manifest("rayservice"))
    for role, pod in pod_specs(spec):
        ports = {p["name"]: p["containerPort"] for p in pod["containers"][0].get("ports", [])}
        assert ports.get("serve") == port, role


# --------------------------------------------------------------------------------------------- Dockerfile


def quick_start_commands() -> list[str]:
    """The shell lines of the README's ``## Quick start`` code blocks."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", section, flags=re.S)
    lines = [line.strip() for b in blocks for line in b.splitlines()]
    assert lines, "no code block in the README quick start"
    return [line for line in lines if line and not line.startswith("#")]


def test_local_package_install_parser():
    cmd = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test, gpu]" && pytest'
    assert local_package_installs(cmd) == [(True, frozenset({"test", "gpu"}))]
    assert local_package_installs("pip install --no-cache-dir . ray==2.60.0") == [(False, frozenset())]
    assert local_package_installs(". .venv/bin/activate && raydebias demo") == []


def test_dockerfile_installs_the_readme_extras():
    readme_installs = {i for line in quick_start_commands() if "pip install" in line
                       for i in local_package_installs(line)}
    assert len(readme_installs) == 1, f"the quick start should install the package one way: {readme_installs}"
    ((_, readme_extras),) = readme_installs

    runs = [expand(a, docker_args()) for i, a in dockerfile() if i == "RUN"]
    docker_installs = [i for r in runs for i in local_package_installs(r)]
    assert len(docker_installs) == 1, docker_installs
    ((editable, docker_extras),) = docker_installs
    # Same extras as the quick start: the image has the dependency set the tests run against.
    assert docker_extras == readme_extras, (docker_extras, readme_extras)
    assert editable, "editable, as in the README: configs/ resolves into the installed package"
    pins = [t for r in runs for t in shlex.split(r) if t.startswith("ray[") or t.startswith("ray==")]
    assert pins and all(t.endswith("==" + docker_args()["RAY_VERSION"]) for t in pins), pins


def test_dockerfile_base_image_is_ray_gpu():
    args = docker_args()
    (base,) = [expand(a, args) for i, a in dockerfile() if i == "FROM"]
    assert base == f"rayproject/ray:{args['RAY_VERSION']}-py311-gpu"


def test_dockerfile_copies_the_repo():
    instrs = dockerfile()
    workdir = [a for i, a in instrs if i == "WORKDIR"][-1]
    assert workdir == "/app"
    copies = [shlex.split(a) for i, a in instrs if i == "COPY"]
    copies = [[t for t in c if not t.startswith("--")] for c in copies]
    assert any(c[:-1] == ["."] and c[-1].rstrip("/") in (workdir, ".") for c in copies), copies
    assert (ROOT / "configs").is_symlink() and (ROOT / "configs" / "demo.yaml").is_file()
    ignore = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
              if p.strip() and not p.startswith("#")]
    assert {".venv", "runs"} <= set(ignore)
    needed = ["raydebias", "raydebias/configs", "configs", "pyproject.toml", "README.md"]  # README: project.readme
    from fnmatch import fnmatch

    assert not [(n, p) for n in needed for p in ignore if fnmatch(n, p.strip("/"))]


def test_dockerfile_ports_and_entrypoint():
    instrs = dockerfile()
    exposed = {int(p.split("/")[0]) for i, a in instrs if i == "EXPOSE" for p in a.split()}
    assert {8000, 8265} <= exposed
    (entrypoint,) = [json.loads(a) for i, a in instrs if i == "ENTRYPOINT"]  # exec form
    (cmd,) = [json.loads(a) for i, a in instrs if i == "CMD"]
    argv = entrypoint + cmd
    assert "raydebias" in argv[0]
    assert argv[1] == "run" and (ROOT / run_argv(argv[2:])[0]).is_file()


HARDENED = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_every_container_is_hardened(kind):
    """Non-root, no privilege escalation, read-only root with a size-limited /tmp, ephemeral-storage limits."""
    doc = manifest(kind)
    spec = cluster_spec(kind, doc)
    containers = dict(all_containers(kind, doc))
    if kind == "rayjob":
        for c in doc["spec"]["submitterPodTemplate"]["spec"]["containers"]:
            containers[f"submitter/{c['name']}"] = c
    assert "head/autoscaler" in containers
    for where, c in containers.items():
        sc = c.get("securityContext", {})
        assert {k: sc.get(k) for k in HARDENED} == HARDENED, where
        assert "/tmp" in [m["mountPath"] for m in c.get("volumeMounts", [])], f"{where}: no writable /tmp"
        if "resources" in c:
            for part in ("requests", "limits"):
                assert "ephemeral-storage" in c["resources"][part], f"{where}: {part} without ephemeral-storage"
    pods = [pod for _, pod in pod_specs(spec)]
    if kind == "rayjob":
        pods.append(doc["spec"]["submitterPodTemplate"]["spec"])
    for pod in pods:
        tmp = [v for v in pod.get("volumes", []) if v["name"] == "tmp"]
        assert tmp and tmp[0]["emptyDir"].get("sizeLimit"), "the writable /tmp must be a size-limited emptyDir"


def test_network_policy_guards_the_serve_port():
    pol = load_yaml(K8S / "networkpolicy.yaml")
    assert pol["apiVersion"] == "networking.k8s.io/v1" and pol["kind"] == "NetworkPolicy"
    assert "networkpolicy.yaml" in load_yaml(K8S / "kustomization.yaml")["resources"]
    selected = pol["spec"]["podSelector"]["matchLabels"]
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    # it selects every raydebias pod (head and workers of all three kinds, and the RayJob submitter)
    for kind in MANIFESTS:
        doc = manifest(kind)
        templates = [g["template"] for g in [cluster_spec(kind, doc)["headGroupSpec"],
                                             *cluster_spec(kind, doc)["workerGroupSpecs"]]]
        if kind == "rayjob":
            templates.append(doc["spec"]["submitterPodTemplate"])
        for t in templates:
            labels = t.get("metadata", {}).get("labels", {})
            assert selected.items() <= labels.items(), (kind, labels)
    # port 8000 is reachable only from an explicit selector: no rule without `from` opens it
    serve_port = serve_config()["http_options"]["port"]
    for rule in pol["spec"]["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every source"
        ports = [p["port"] for p in rule.get("ports", [])]
        if not ports:  # all ports: only from the raydebias pods themselves
            assert rule["from"] == [{"podSelector": {"matchLabels": selected}}]
    (serve_rule,) = [r for r in pol["spec"]["ingress"] if serve_port in [p["port"] for p in r.get("ports", [])]]
    assert serve_rule["from"] == [{"podSelector": {"matchLabels": {"raydebias-client": "true"}}}]
