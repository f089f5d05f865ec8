"""``distill-ray serve --ingress haproxy`` as a user runs it: its own local Ray with Ray Serve's
throughput settings (``serving.launch.ingress_settings``), HAProxy bound to 127.0.0.1 in front of the
replica, real HTTP, a bad request answered 4xx while the server keeps serving, and Ctrl-C stopping it
and its HAProxy.

Its own process and its own Ray (not the session's): the settings are read when Serve's processes
start, which is what this checks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from distill_ray.models import build_model, save_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listeners(port: int) -> list[tuple[str, str]]:
    """(process name, bound address) of every socket listening on TCP ``port``, from iproute2's ss."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():  # LISTEN 0 4096 127.0.0.1:8123 0.0.0.0:* users:(("haproxy",pid=1,fd=11))
        fields = line.split()
        found.append((fields[5].split('"')[1], fields[3].rsplit(":", 1)[0]))
    return found


def test_cli_serves_behind_haproxy_on_loopback_and_ctrl_c_stops_it(tmp_path):
    torch.manual_seed(0)
    model = build_model("mlp", (4,), 3, {"hidden": [8]})
    student = save_model(model, tmp_path / "student", {"arch": "mlp", "input_shape": [4], "num_classes": 3,
                                                       "options": {"hidden": [8]}, "task": "classification"})
    (student / "distill_card.json").write_text(json.dumps({"name": "cli", "version": "v1",
                                                           "class_names": ["a", "b", "c"]}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_") and k != "RAY_ADDRESS"}
    env["RAY_ADDRESS"] = "local"  # a Ray of its own, as on a laptop with none running
    # A replica behind HAProxy drains for 30 s before it stops (Ray's default, for load balancers to
    # notice); nothing here sends during the stop, so the test does not wait it out.
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "distill_ray", "serve", str(student), "--port", str(port),
                             "--ingress", "haproxy", "--metrics-port", str(free_port())],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 150
        # What the user waits for: the line that says where it serves (printed once /healthz answers).
        while not any(line.startswith("Serving ") for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.25)
        assert f"at {url}" in next(line for line in lines if line.startswith("Serving "))

        # Ray Serve's HAProxy (its bundled binary) answers on the user's port, bound to loopback only.
        assert listeners(port) == [("haproxy", "127.0.0.1")]
        good = httpx.post(f"{url}/predict", json={"inputs": [[0.1, 0.2, 0.3, 0.4]]}, timeout=30)
        assert good.status_code == 200 and good.json()["predictions"][0] in ("a", "b", "c")
        expected = torch.softmax(model(torch.tensor([[0.1, 0.2, 0.3, 0.4]])), -1)[0].tolist()
        assert good.json()["probabilities"][0] == pytest.approx(expected, abs=1e-5)
        bad = httpx.post(f"{url}/predict", json={"inputs": [[0.1, 0.2]]}, timeout=30)
        assert bad.status_code == 422 and "inputs[0]" in bad.json()["error"]
        assert httpx.post(f"{url}/predict", json={"inputs": [[1, 2, 3, 4]]}, timeout=30).status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 0, out[-2000:]
    assert "Stopping the student deployment" in out
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/healthz", timeout=2)
    assert listeners(port) == []  # no HAProxy left holding the port
