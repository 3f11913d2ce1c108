"""A worker process (``python -m gateway.workers``) driven over its control socket by the test
as the supervisor would: malformed and unknown control messages are logged and ignored, and
the worker keeps answering the ones that follow."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import orjson

from gateway import ipc
from tests.integration.conftest import ROOT, free_ports, stop_process


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(len(payload).to_bytes(4, "big") + payload)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the worker closed its control socket"
        data += chunk
    return data


def recv_message(sock: socket.socket) -> ipc.ToSupervisor:
    size = int.from_bytes(recv_exactly(sock, 4), "big")
    return ipc.parse_to_supervisor(recv_exactly(sock, size))


def test_worker_ignores_malformed_control_messages() -> None:
    port, admin, backend = free_ports(3)
    text = (
        f"listen: 127.0.0.1:{port}\n"
        f"admin: 127.0.0.1:{admin}\n"
        f"upstreams:\n  app:\n    instances: ['127.0.0.1:{backend}']\n"
        "routes:\n  - name: all\n    match: {path: {prefix: /}}\n    upstream: app\n"
    )
    payload: ipc.ConfigPayload = {
        "source": "control-test.yaml",
        "text": text,
        "sha256": "0" * 64,
        "references": {},
        "tls": {},
        "discovered": {},
        "unhealthy": [],
        "ejected": [],
    }
    ours, theirs = socket.socketpair()
    argv = [sys.executable, "-m", "gateway.workers", "--ipc-fd", str(theirs.fileno())]
    process = subprocess.Popen(
        [*argv, "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        pass_fds=(theirs.fileno(),),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    theirs.close()
    ours.settimeout(30)
    try:
        send_frame(ours, orjson.dumps(ipc.config_message(payload, 1)))
        assert recv_message(ours) == ipc.ready_message(1, process.pid, "0" * 64)
        for bad in [
            b"{not json",
            b'["config"]',
            b'{"op": "reboot"}',
            b'{"op": "health", "upstream": "app"}',
            b'{"op": "eject", "upstream": "app", "address": "x", "until": "later"}',
            b'{"op": "metrics", "seq": "2"}',
        ]:
            send_frame(ours, bad)
        send_frame(ours, orjson.dumps(ipc.health_message("app", f"127.0.0.1:{backend}", False)))
        # The health message after the bad ones was applied: instance states are exported
        # once a second, so ask until they show it.
        deadline = time.monotonic() + 10
        seq, states = 2, {}
        while states.get("unhealthy") != 1 and time.monotonic() < deadline:
            seq += 1
            send_frame(ours, orjson.dumps(ipc.metrics_request(seq)))
            reply = recv_message(ours)
            assert reply["op"] == "metrics" and reply["seq"] == seq
            states = reply["state"]["instance_states"].get("app", {})
        assert states.get("unhealthy") == 1, states
        assert process.poll() is None  # still running
    finally:
        ours.close()  # EOF: the worker drains and exits on its own
        try:
            process.wait(15)
        finally:
            stop_process(process)
    stderr = process.stderr.read().decode() if process.stderr else ""
    assert stderr.count("ignored a control message") == 6, stderr
    assert process.returncode == 0, stderr
