"""The main job on a real two-node Ray, submitted through the Jobs API with token auth on.

The cluster is ``cluster/local.sh`` (head + one worker node, each a ``ray start --block`` in its
own process group, own temp dir and ports), started once for this module in subprocesses and
stopped by pid in a finalizer. The pytest process never joins it (it may already be connected to
the session's ``ray_local``): it talks HTTP to the dashboard with ``Authorization: Bearer``.

Faults injected into one run, and what is checked afterwards in its own records (metrics.json,
history.json, Ray Train's checkpoint_manager_snapshot.json, the state API's actor table):
  * the job is stopped mid-run and submitted again with the same run name: it resumes;
  * then the worker node's raylet is SIGKILLed mid-run (training placed there by CPUs: the head has
    1, a worker needs 2), a replacement node joins: Train V2 restarts the worker group there and
    resumes from the latest checkpoint;
  * in the end the job succeeds, the student learns, history has every step once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "cluster" / "local.sh"
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Speed settings tests/conftest.py gives the session's Ray, passed to the jobs' workers too.
_TEST_RAY_ENV = ("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "RAY_DATA_PARQUET_FOOTER_IO_CONCURRENCY",
                 "RAY_DATA_USE_DATASOURCE_V2")


# --- the cluster --------------------------------------------------------------------------------

def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class LocalCluster:
    root: Path  # DISTILL_LOCAL_DIR: Ray temp dirs, pid files, logs, token; runs and caches too
    env: dict[str, str]
    dashboard: str
    token: str

    def sh(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(LOCAL_SH), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard, headers=self.headers)

    def api(self, path: str):
        request = urllib.request.Request(self.dashboard + path, headers=self.headers)
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def node_pid(self, node: str) -> int:
        return int((self.root / f"{node}.pid").read_text())

    def logs(self, chars: int = 3000) -> str:
        return "".join(f"\n--- {p.name}\n{p.read_text()[-chars:]}" for p in sorted((self.root / "logs").glob("*.out")))

    def nodes(self) -> list[dict]:
        return self.api("/api/v0/nodes?detail=1&limit=100")["data"]["result"]["result"]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command name) of every process, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        found[int(entry.name)] = (int(stat[stat.rindex(")") + 2:].split()[1]), name)
    return found


def _tree(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of ``pid`` and every process below it."""
    processes = _processes()
    tree, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        if parent in processes:
            tree.append((parent, processes[parent][1]))
        frontier += [child for child, (ppid, _) in processes.items() if ppid == parent]
    return tree


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def cluster(request, tiny_prepared) -> LocalCluster:
    if shutil.which("setsid") is None or not Path("/proc").is_dir():
        pytest.skip("cluster/local.sh needs setsid and /proc (Linux)")
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        pytest.skip(f"no ray executable next to {sys.executable}")
    # Short path: Ray's unix sockets live under it (sun_path is limited to 107 bytes).
    root = Path(tempfile.mkdtemp(prefix="drmn-", dir="/tmp"))
    # The session's tiny teachers and cache where the jobs' configs look (_overrides): the first job
    # reuses them and goes straight to training, the part under test. (The jobs read the data from the
    # session's data cache, see _runtime_env: the cache's key holds the data file's path.)
    tiny_prepared(root)
    gcs, dashboard, client, agent = _free_ports(4)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k not in ("PYTEST_CURRENT_TEST",)}
    env.update({
        "DISTILL_LOCAL_DIR": str(root), "GCS_PORT": str(gcs), "DASHBOARD_PORT": str(dashboard),
        "CLIENT_PORT": str(client), "AGENT_PORT": str(agent), "RAY": str(ray_bin),
        # The head cannot host a 2-CPU training worker; the worker node can.
        "HEAD_CPUS": "1", "WORKER_CPUS": "2", "OBJECT_STORE_MEMORY": str(400 * 1024 * 1024),
        "RAY_AUTH_TOKEN_PATH": str(root / "auth_token"),  # never the user's ~/.ray/auth_token
        # Declare a silent node dead after ~3 s instead of ~15 s.
        "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
        "OMP_NUM_THREADS": "1",
        # The test's cluster is thrown away: its nodes get 3 s to stop on SIGTERM, not 20.
        "STOP_WAIT_S": "3",
    })
    c = LocalCluster(root=root, env=env, dashboard=f"http://127.0.0.1:{dashboard}", token="")

    def teardown():
        try:
            c.sh("stop", timeout=120)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    request.addfinalizer(teardown)
    started = c.sh("start", timeout=420)
    assert started.returncode == 0, f"local.sh start failed:\n{started.stdout}\n{started.stderr}" + c.logs()
    c.token = (root / "auth_token").read_text().strip()
    return c


# --- jobs ---------------------------------------------------------------------------------------

def _overrides(cluster: LocalCluster, name: str, *extra: str) -> list[str]:
    r = cluster.root
    return [f"name={name}", f"run_dir={r}/runs", f"cache.dir={r}/cache",
            f"teachers.0.path={r}/teachers/mlp_a", f"teachers.1.path={r}/teachers/cnn_b", *extra]


def _runtime_env(cluster: LocalCluster) -> dict:
    """jobs/runtime_env.yaml, with this checkout as the working_dir (as `--working-dir .` does)."""
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    env["working_dir"] = str(REPO)
    from distill_ray.data.bundled import cache_root

    # The Fashion-MNIST table the session already wrote (read only here), so the data fingerprint, and
    # with it the copied soft-target cache, is the session's.
    env["env_vars"] = {**env.get("env_vars", {}), "DISTILL_RAY_CACHE": str(cache_root()),
                       "WANDB_MODE": "offline", "RAY_DEDUP_LOGS": "0",
                       # the test settings of tests/conftest.py (the cluster's own env drops RAY_*)
                       **{k: os.environ[k] for k in _TEST_RAY_ENV if k in os.environ}}
    return env


def _submit(cluster: LocalCluster, overrides: list[str]) -> str:
    entrypoint = "python jobs/distill.py --config jobs/configs/tiny.yaml " + " ".join(
        f"--set {shlex.quote(o)}" for o in overrides)
    return cluster.client().submit_job(entrypoint=entrypoint, runtime_env=_runtime_env(cluster))


def _status(cluster: LocalCluster, job: str) -> str:
    return str(cluster.client().get_job_status(job).value)


def _wait_job(cluster: LocalCluster, job: str, timeout: float = 480) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _status(cluster, job)
        if status in TERMINAL:
            return status
        time.sleep(2)
    cluster.client().stop_job(job)
    pytest.fail(f"job {job} did not finish in {timeout}s; log tail:\n{_log_tail(cluster, job)}")


def _log_tail(cluster: LocalCluster, job: str, chars: int = 6000) -> str:
    try:
        return cluster.client().get_job_logs(job)[-chars:]
    except Exception as err:  # noqa: BLE001 - only for a failure message
        return f"<no logs: {err}>"


def _config(cluster: LocalCluster, overrides: list[str]):
    from distill_ray.config import load_config

    return load_config(TINY, overrides)


def _expected_steps(cfg) -> int:
    """Optimizer steps of a full run, by the loop's own rules (a partly open curriculum epoch has
    fewer batches). One worker: its shard is the whole open subset."""
    import torch

    from distill_ray.kd.curriculum import open_subset
    from distill_ray.pipeline import load_data
    from distill_ray.kd.objectives import stage_and_fraction

    assert cfg.train.num_workers == 1
    n = load_data(cfg).info.counts["train"]
    total = 0
    for epoch in range(cfg.train.epochs):
        _, fraction = stage_and_fraction(cfg, epoch, total)
        total += open_subset(torch.arange(n), fraction).shape[0] // cfg.train.batch_size
    return total


def _storage(cfg) -> Path:
    return cfg.run_path() / "ray_results" / "student"


def _registered_checkpoint(cfg) -> tuple[Path, dict] | None:
    """The latest checkpoint Ray Train has registered (what a restart resumes from) and its metrics."""
    snapshot = _storage(cfg) / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not latest:
        return None
    return _storage(cfg) / latest["checkpoint_dir_name"], latest["metrics"]


def _wait_for_mid_run_checkpoint(cluster: LocalCluster, job: str, cfg, total: int, timeout: float = 420,
                                 after_step: int = 0):
    """The first registered checkpoint past ``after_step`` (a resumed run's own, not the one it resumed
    from); fails if the job ends first or the run was already done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _registered_checkpoint(cfg)
        if found and found[1]["step"] > after_step and (found[0] / "history.json").is_file():
            assert found[1]["step"] < total, f"the run was already done when a checkpoint was seen: {found[1]}"
            return found
        status = _status(cluster, job)
        assert status not in TERMINAL, f"job ended ({status}) before a checkpoint:\n{_log_tail(cluster, job)}"
        time.sleep(0.2)
    pytest.fail(f"no checkpoint in {_storage(cfg)} after {timeout}s:\n{_log_tail(cluster, job)}")


def _checkpoint_history(cfg) -> tuple[int, list[dict]]:
    """Step and history.json of the checkpoint a restart resumes from (read right after the fault)."""
    for _ in range(50):
        found = _registered_checkpoint(cfg)
        if found:
            try:
                return found[1]["step"], json.loads((found[0] / "history.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                pass
        time.sleep(0.1)
    pytest.fail(f"could not read the registered checkpoint's history under {_storage(cfg)}")


def _train_workers(cluster: LocalCluster, job_id: str) -> list[dict]:
    """Ray Train worker actors of one job, from the state API (alive and dead)."""
    actors = cluster.api("/api/v0/actors?detail=1&limit=1000&filter_keys=class_name&filter_predicates=%3D"
                         "&filter_values=RayTrainWorker")["data"]["result"]["result"]
    return [a for a in actors if a.get("job_id") == job_id]


def _check_run_records(cfg, total: int) -> list[dict]:
    """metrics.json and history.json of a finished run: full step count, every step once."""
    run = cfg.run_path()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["student"] > 0.5, metrics
    print(f"{cfg.name}: student accuracy {metrics['student']:.4f}, phase seconds {metrics['timings']}")
    history = json.loads((run / "history.json").read_text())
    steps = [row["step"] for row in history if row.get("kind") != "epoch"]
    assert steps == sorted(set(steps)), f"a step recorded twice or out of order: {steps}"
    assert steps[-1] == total
    epochs = [row for row in history if row.get("kind") == "epoch"]
    assert [row["epoch"] for row in epochs] == list(range(cfg.train.epochs))
    assert epochs[-1]["step"] == total
    return history


def _check_resumed(history: list[dict], checkpoint_step: int, checkpoint_history: list[dict], total: int) -> None:
    """The final history starts with the checkpoint's rows exactly (wall-clock samples_per_s
    included, which a rerun from step 0 would not reproduce) and goes on from its step."""
    assert checkpoint_history, "the checkpoint held no history"
    assert 0 < checkpoint_step < total
    assert checkpoint_history[-1]["step"] == checkpoint_step
    assert history[:len(checkpoint_history)] == checkpoint_history, "rows saved in the checkpoint were lost"
    after = [row for row in history[len(checkpoint_history):] if row.get("kind") != "epoch"]
    assert after and after[0]["step"] > checkpoint_step


# --- tests --------------------------------------------------------------------------------------

def test_the_two_node_cluster_wants_the_token_on_loopback_only(cluster):
    nodes = [n for n in cluster.nodes() if n["state"] == "ALIVE"]
    assert len(nodes) == 2 and any("worker_node" in n["resources_total"] for n in nodes)
    # The Jobs API wants the token, and listens on loopback only.
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(cluster.dashboard + "/api/jobs/", timeout=30)
    assert denied.value.code == 401
    port = int(cluster.dashboard.rsplit(":", 1)[1])
    for ip in {n["node_ip"] for n in nodes} - {"127.0.0.1"}:
        with pytest.raises(OSError):
            socket.create_connection((ip, port), timeout=5).close()


def test_a_job_resumes_after_a_stop_and_again_after_its_node_dies(cluster):
    """Both faults in one run's life (one run name, so the cluster starts one tiny run, not two): the
    job is stopped mid-run and submitted again, and the new job resumes from the stopped one's last
    checkpoint; then the worker node it trains on dies (its raylet SIGKILLed), a replacement joins,
    Train V2 restarts the worker group there from the latest checkpoint, and the job finishes with
    every step recorded once and the student exported."""
    # 2 CPUs per worker: only the worker node fits one (the head has 1).
    overrides = _overrides(cluster, "mn-faults", "train.epochs=6", "train.cpus_per_worker=2")
    cfg = _config(cluster, overrides)
    total = _expected_steps(cfg)
    t0 = time.monotonic()

    # Fault 1: the job is stopped; the Train controller and its workers die with the stopped driver.
    first = _submit(cluster, overrides)
    _wait_for_mid_run_checkpoint(cluster, first, cfg, total)
    cluster.client().stop_job(first)
    assert _wait_job(cluster, first, timeout=120) == "STOPPED"
    first_id = cluster.client().get_job_info(first).job_id
    for _ in range(120):
        if not [a for a in _train_workers(cluster, first_id) if a["state"] != "DEAD"]:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"training workers of the stopped job still alive: {_train_workers(cluster, first_id)}")
    stop_step, stop_history = _checkpoint_history(cfg)
    assert not (cfg.run_path() / "metrics.json").exists()
    print(f"stopped at step {stop_step} after {time.monotonic() - t0:.0f}s")

    # Fault 2: the same job submitted again resumes, checkpoints further on, and loses its node.
    doomed = [n for n in cluster.nodes() if n["state"] == "ALIVE" and "worker_node" in n["resources_total"]]
    assert len(doomed) == 1
    doomed_id = doomed[0]["node_id"]
    second = _submit(cluster, overrides)
    _wait_for_mid_run_checkpoint(cluster, second, cfg, total, after_step=stop_step)
    # The worker node vanishes: every process of it (raylet, workers, the training worker) is SIGKILLed
    # at once. With only the raylet killed, the training worker ran on until it noticed, and once (in
    # CI) finished the run through its direct connection to the controller before the node was dead.
    doomed_processes = _tree(cluster.node_pid("worker-1"))
    assert "raylet" in [name for _, name in doomed_processes], doomed_processes
    for pid, _ in doomed_processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for _ in range(120):
        if not any(_alive(pid) for pid, _ in doomed_processes):
            break
        time.sleep(0.5)
    assert not any(_alive(pid) for pid, _ in doomed_processes), "a process of the killed node lives on"
    # Nothing trains until a node with 2 free CPUs joins: this is what a restart resumes from.
    node_step, node_history = _checkpoint_history(cfg)
    added = cluster.sh("add-worker", timeout=300)
    assert added.returncode == 0, added.stderr + cluster.logs()
    print(f"killed at step {node_step}; replacement node up after {time.monotonic() - t0:.0f}s")

    status = _wait_job(cluster, second, timeout=480)
    print(f"job {status} after {time.monotonic() - t0:.0f}s")
    assert status == "SUCCEEDED", _log_tail(cluster, second)
    history = _check_run_records(cfg, total)
    assert stop_step < node_step
    _check_resumed(history, stop_step, stop_history, total)  # the resubmitted job went on from the stop
    _check_resumed(history, node_step, node_history, total)  # the restarted workers from the node's death
    assert (cfg.run_path() / "student").is_dir()

    # Ray's own records: the node is dead, and the second job's training workers ran on it and then
    # on the replacement.
    states = {n["node_id"]: n["state"] for n in cluster.nodes()}
    assert states[doomed_id] == "DEAD"
    worker_nodes = {a["node_id"] for a in _train_workers(cluster, cluster.client().get_job_info(second).job_id)}
    assert doomed_id in worker_nodes and len(worker_nodes) >= 2, (doomed_id, worker_nodes)
