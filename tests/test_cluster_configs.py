"""cluster/ and jobs/ deployment files: they parse, carry the fields their tools need, and keep
token authentication on. Fast and offline; nothing is started.

The launcher YAML is validated with Ray's own schema and ``prepare_config``/``validate_config``.
KubeRay's CRD schemas are not shipped with Ray, so the RayCluster/RayJob manifests get a
structural check of the fields this project relies on (they were validated once against KubeRay's
``ray.io/v1`` CRDs by hand; see cluster/README.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
YAMLS = sorted(CLUSTER.glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _ray_docs(path: Path) -> list[dict]:
    return [d for d in _docs(path) if d.get("apiVersion") == "ray.io/v1"]


def _strings(node) -> list[str]:
    """Every string in a parsed YAML tree (keys and values)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


# --- every file -----------------------------------------------------------------------------------

def test_cluster_dir_has_the_deliverables():
    names = {p.name for p in CLUSTER.iterdir()}
    assert {"aws.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "local.sh", "README.md"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_parses(path):
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


def _find_key(node, key: str):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _find_key(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _find_key(v, key)


def _auth_on(doc: dict) -> bool:
    """RAY_AUTH_MODE=token in a container env list or in a shell command of the document."""
    in_env = any(isinstance(e, dict) and e.get("name") == "RAY_AUTH_MODE" and e.get("value") == "token"
                 for envs in _find_key(doc, "env") if isinstance(envs, list) for e in envs)
    return in_env or any("RAY_AUTH_MODE=token" in s for s in _strings(doc))


def _dashboard_on_all_interfaces(doc: dict) -> bool:
    in_params = any(isinstance(p, dict) and p.get("dashboard-host") == "0.0.0.0"
                    for p in _find_key(doc, "rayStartParams"))
    return in_params or any(re.search(r"dashboard[-_]host[= ]+[\"']?0\.0\.0\.0", s) for s in _strings(doc))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_token_auth_is_on_and_no_open_dashboard_without_it(path):
    ray_docs = [d for d in _docs(path) if d.get("kind") != "PersistentVolumeClaim"]
    assert ray_docs
    for doc in ray_docs:
        where = f"{path.name}: {doc.get('kind', 'launcher')}"
        assert _auth_on(doc), f"{where} does not turn on RAY_AUTH_MODE=token"
        # A dashboard on every interface is only acceptable where the token guards it (KubeRay: the
        # head Service needs the pod IP), checked per document so one cannot vouch for another.
        if _dashboard_on_all_interfaces(doc):
            assert _auth_on(doc), f"{where}: dashboard on 0.0.0.0 without a token"


def test_local_sh_turns_token_auth_on():
    text = (CLUSTER / "local.sh").read_text()
    assert re.search(r"^export RAY_AUTH_MODE=token$", text, re.M)


# --- cluster launcher (AWS) -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def test_launcher_matches_rays_schema(aws):
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(aws, schema)
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(aws)
    validate_config(prepared)  # Ray's own checks after filling in provider defaults
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_launcher_has_a_head_and_an_autoscaling_gpu_group(aws):
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in aws, key
    types = aws["available_node_types"]
    assert aws["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != aws["head_node_type"]}
    gpu = {name: t for name, t in workers.items()
           if re.match(r"(g|p)\d", t["node_config"]["InstanceType"]) or t["resources"].get("GPU", 0) > 0}
    assert gpu, "no GPU worker group"
    for t in gpu.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= aws["max_workers"]


def test_launcher_installs_pinned_torch_before_the_package(aws):
    setup = aws["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==2.13.0" in c)
    package_at = next(i for i, c in enumerate(setup) if "-e ~/distill-ray" in c)
    assert torch_at < package_at
    assert aws["file_mounts"]["~/distill-ray"] == "."


def test_launcher_starts_ray_with_token_auth_and_a_local_dashboard(aws):
    head = " ".join(aws["head_start_ray_commands"])
    worker = " ".join(aws["worker_start_ray_commands"])
    for cmd in (head, worker):
        assert re.search(r"RAY_AUTH_MODE=token\b[^;]*\bray start", cmd), cmd
    assert "--dashboard-host=127.0.0.1" in head
    assert "~/.ray/auth_token" in aws["file_mounts"]  # the same token on every node


# --- KubeRay --------------------------------------------------------------------------------------

def _ray_containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def _check_cluster_spec(spec: dict, where: str) -> None:
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert spec["workerGroupSpecs"], f"{where}: no worker groups"
    for group in [head, *spec["workerGroupSpecs"]]:
        # KubeRay's rayStartParams is map[string]string.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
        assert group["template"]["spec"]["containers"], where
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas"):
            assert key in group, f"{where}: worker group lacks {key}"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if int(limits.get("nvidia.com/gpu", 0)) > 0:
            gpu_groups.append(group["groupName"])
            assert group["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == \
                limits["nvidia.com/gpu"]
    assert gpu_groups, f"{where}: no worker group with nvidia.com/gpu limits"
    for container in _ray_containers(spec):
        env = _env(container)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: {container['name']}"
        token = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token["key"] == "auth_token"
        assert "limits" in container["resources"] and "requests" in container["resources"]


def test_raycluster_manifest():
    docs = _ray_docs(CLUSTER / "kuberay-raycluster.yaml")
    assert [d["kind"] for d in docs] == ["RayCluster"]
    rc = docs[0]
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    assert rc["spec"]["rayVersion"].startswith("2.60")
    _check_cluster_spec(rc["spec"], "RayCluster")
    assert rc["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    # The PVC the pods mount is defined alongside.
    claims = {v["persistentVolumeClaim"]["claimName"] for v in rc["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]}
    pvcs = {d["metadata"]["name"] for d in _docs(CLUSTER / "kuberay-raycluster.yaml") if d["kind"] == "PersistentVolumeClaim"}
    assert claims <= pvcs


def test_rayjob_manifest_runs_the_main_job():
    docs = _ray_docs(CLUSTER / "kuberay-rayjob.yaml")
    assert [d["kind"] for d in docs] == ["RayJob"]
    job = docs[0]
    assert job["apiVersion"] == "ray.io/v1"
    entrypoint = job["spec"]["entrypoint"]
    assert "jobs/distill.py" in entrypoint
    config = re.search(r"--config\s+(\S+)", entrypoint).group(1)
    assert (REPO / config).is_file(), config
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) <= {"working_dir", "env_vars", "pip", "py_modules", "excludes"}
    _check_cluster_spec(job["spec"]["rayClusterSpec"], "RayJob.rayClusterSpec")
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert _env(submitter)["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" in _env(submitter)


# --- local.sh -------------------------------------------------------------------------------------

def test_local_sh_is_valid_bash_and_executable():
    path = CLUSTER / "local.sh"
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert os.access(path, os.X_OK)
    text = path.read_text()
    assert "--dashboard-host 127.0.0.1" in text and "0.0.0.0" not in text
    assert re.search(r"--resources \"\$WORKER_RESOURCES\"", text)
    # `stop` goes by pid: no machine-wide `ray stop` outside comments.
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if re.search(r"(\bray|\$RAY\"?) stop\b", line)]


def test_local_sh_rejects_unknown_commands():
    got = subprocess.run(["bash", str(CLUSTER / "local.sh"), "frobnicate"], capture_output=True, text=True,
                         env={**os.environ, "DISTILL_LOCAL_DIR": "/nonexistent/drmn"})
    assert got.returncode != 0 and "usage" in got.stderr


# --- jobs/ --------------------------------------------------------------------------------------------

def test_runtime_env_example_is_valid(monkeypatch):
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert raw["working_dir"] == "."
    assert raw["env_vars"]["OMP_NUM_THREADS"] == "1"
    monkeypatch.chdir(REPO)  # working_dir is relative to where you submit from
    RuntimeEnv(**raw)


def test_gpu_config_shares_gpus_between_teachers():
    from distill_ray.config import load_config

    cfg = load_config(REPO / "jobs" / "configs" / "cluster_gpu.yaml")
    assert cfg.train.use_gpu and cfg.train.num_workers == 4
    assert all(0 < t.num_gpus < 1 and t.dtype == "bfloat16" for t in cfg.teachers)
    laptop = load_config(REPO / "jobs" / "configs" / "laptop.yaml")
    assert not laptop.train.use_gpu and all(t.num_gpus == 0 for t in laptop.teachers)


@pytest.mark.parametrize("script", ["distill.py", "cache_teachers.py"])
def test_entrypoints_fail_on_a_bad_config_in_one_line(script, tmp_path):
    bad = subprocess.run([sys.executable, str(REPO / "jobs" / script), "--config",
                          str(REPO / "jobs" / "configs" / "tiny.yaml"), "--set", "train.epoch=3"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "train.epoch" in bad.stderr and "did you mean 'epochs'" in bad.stderr
    missing = subprocess.run([sys.executable, str(REPO / "jobs" / script), "--config", "nope.yaml"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_readme_walks_from_laptop_to_cluster():
    text = (CLUSTER / "README.md").read_text()
    assert text.startswith("# From laptop to cluster")
    for needle in ("cluster/local.sh start", "ray job submit", "RAY_AUTH_MODE=token", "Authorization: Bearer",
                   "kubectl apply -f cluster/kuberay-raycluster.yaml", "kubectl apply -f cluster/kuberay-rayjob.yaml",
                   "ray up cluster/aws.yaml", "jobs/configs/cluster_gpu.yaml"):
        assert needle in text, needle
