"""The node agent's kubelet parts that need no cluster: log reading, request attributes, probe state and actions.

Probe actions run against real sockets, a real HTTP server and real host processes on loopback.
"""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster import kubelet_api
from localcluster.kubelet_api import ContainerLog, User, peer_user, read_log, request_attributes, tail_offset
from localcluster.probes import ContainerProber, ProbeError, ProbeState, http_get, resolve_port, tcp_socket
from localcluster.runtime import ContainerSpec, HostProcessRuntime, RunningContainer


@pytest.mark.parametrize(
    ("text", "lines", "expected"),
    [
        ("a\nb\nc\n", 2, "b\nc\n"),
        ("a\nb\nc", 2, "b\nc"),
        ("a\nb\nc\n", 10, "a\nb\nc\n"),
        ("a\nb\nc\n", 0, ""),
        ("", 3, ""),
        ("\n\n", 1, "\n"),
    ],
)
def test_tail_offset_finds_where_the_last_lines_start(tmp_path: Path, text: str, lines: int, expected: str) -> None:
    path = tmp_path / "0.log"
    path.write_text(text)
    assert text[tail_offset(path, lines) :] == expected


def test_tail_offset_reads_back_across_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kubelet_api, "READ_BLOCK", 7)
    text = "".join(f"line {i}\n" for i in range(100))
    path = tmp_path / "0.log"
    path.write_text(text)
    assert path.read_text()[tail_offset(path, 3) :] == "line 97\nline 98\nline 99\n"


def test_read_log_applies_tail_then_limit(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    path.write_text("one\ntwo\nthree\n")
    log = ContainerLog(path, lambda: False)
    assert b"".join(read_log(log, follow=False, tail_lines=2, limit_bytes=5)) == b"two\nt"
    assert b"".join(read_log(log, follow=True, tail_lines=None, limit_bytes=None)) == b"one\ntwo\nthree\n"


def test_read_log_follows_until_the_container_stops_and_keeps_its_last_words(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    path.write_text("start\n")
    stopped = threading.Event()

    def container() -> None:
        with path.open("a") as f:
            for i in range(3):
                f.write(f"tick {i}\n")
                f.flush()
        stopped.set()  # written before it is seen as stopped, as a process writes before it exits

    chunks = read_log(ContainerLog(path, lambda: not stopped.is_set()), follow=True, tail_lines=None, limit_bytes=None)
    first = next(chunks)
    threading.Thread(target=container).start()
    assert (first + b"".join(chunks)).decode() == "start\ntick 0\ntick 1\ntick 2\n"


@pytest.mark.parametrize(
    ("method", "path", "verb", "subresource"),
    [
        ("GET", "/containerLogs/ns/pod/c", "get", "proxy"),
        ("GET", "/logs/syslog", "get", "log"),
        ("GET", "/stats/summary", "get", "stats"),
        ("GET", "/metrics", "get", "metrics"),
        ("POST", "/exec/ns/pod/c", "create", "proxy"),
        ("GET", "/logsx", "get", "proxy"),
    ],
)
def test_request_attributes_are_the_kubelets(method: str, path: str, verb: str, subresource: str) -> None:
    attributes = request_attributes(method, path, "node-1")
    assert (attributes.verb, attributes.resource, attributes.subresource, attributes.name) == (
        verb,
        "nodes",
        subresource,
        "node-1",
    )


def test_peer_user_takes_the_common_name_and_organizations() -> None:
    subject = ((("organizationName", "team-a"),), (("organizationName", "team-b"),), (("commonName", "alice"),))
    assert peer_user({"subject": subject}) == User("alice", ("team-a", "team-b"))
    assert peer_user(None) is None
    assert peer_user({}) is None
    assert peer_user({"subject": ((("organizationName", "only-o"),),)}) is None


def test_probe_results_flip_only_at_their_thresholds() -> None:
    readiness = ProbeState("Readiness", {"successThreshold": 2, "failureThreshold": 2}, next_due=0, result=False)
    readiness.record(True)
    assert readiness.result is False
    readiness.record(True)
    assert readiness.result is True
    readiness.record(False)
    readiness.record(True)  # a success in between resets the failures
    readiness.record(False)
    assert readiness.result is True
    readiness.record(False)
    assert readiness.result is False


def test_a_startup_probe_holds_back_the_others_and_sets_started_and_ready() -> None:
    spec = {
        "startupProbe": {"exec": {"command": ["true"]}, "failureThreshold": 1},
        "livenessProbe": {"tcpSocket": {"port": 1}, "initialDelaySeconds": 5},
        "readinessProbe": {"tcpSocket": {"port": 1}},
    }
    prober = ContainerProber.for_container(spec, instance=0, started=100.0)
    assert [p.kind for p in prober.active()] == ["Startup"]
    assert (prober.started, prober.ready, prober.failed()) == (False, False, None)
    prober.probes["Startup"].record(True)
    assert [p.kind for p in prober.active()] == ["Liveness", "Readiness"]
    assert prober.probes["Liveness"].next_due == 105.0
    assert (prober.started, prober.ready) == (True, False)  # readiness starts out failed
    prober.probes["Readiness"].record(True)
    assert prober.ready
    no_probes = ContainerProber.for_container({}, instance=0, started=0.0)
    assert (no_probes.started, no_probes.ready, no_probes.active()) == (True, True, [])


def test_a_failed_startup_or_liveness_probe_means_the_container_must_go() -> None:
    prober = ContainerProber.for_container({"livenessProbe": {"failureThreshold": 1}}, instance=0, started=0.0)
    assert prober.failed() is None  # liveness starts out passing
    prober.probes["Liveness"].record(False)
    failed = prober.failed()
    assert failed is not None and failed.kind == "Liveness"


def test_named_ports_resolve_from_the_containers_ports() -> None:
    container = {"ports": [{"name": "web", "containerPort": 8080}]}
    assert resolve_port("web", container) == 8080
    assert resolve_port(9000, container) == 9000
    assert resolve_port("9001", container) == 9001
    with pytest.raises(ProbeError, match="couldn't find port 'metrics'"):
        resolve_port("metrics", container)


@pytest.fixture
def http_port() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/ok" else 500)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


def test_http_get_passes_on_2xx_and_words_failures_as_the_kubelet(http_port: int) -> None:
    container = {"ports": [{"name": "web", "containerPort": http_port}]}
    assert http_get({"path": "/ok", "port": "web"}, container, 5) == (True, "")
    assert http_get({"path": "/broken", "port": http_port}, container, 5) == (
        False,
        "HTTP probe failed with statuscode: 500",
    )
    port = closed_port()
    assert http_get({"path": "/ok", "port": port}, {}, 5) == (
        False,
        f'Get "http://127.0.0.1:{port}/ok": dial tcp 127.0.0.1:{port}: connect: connection refused',
    )


def test_tcp_socket_passes_when_a_connection_opens(http_port: int) -> None:
    assert tcp_socket({"port": http_port}, {}, 5) == (True, "")
    port = closed_port()
    assert tcp_socket({"port": port}, {}, 5) == (False, f"dial tcp 127.0.0.1:{port}: connect: connection refused")


@pytest.fixture
def sleeping(tmp_path: Path) -> Iterator[RunningContainer]:
    runtime = HostProcessRuntime(images_dir=tmp_path / "images", working_dir=tmp_path, path="/usr/bin:/bin")
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "marker").write_text("here")
    spec = ContainerSpec(
        pod_namespace="ns", pod_name="p", pod_uid="u", name="main", image="host", command=["sleep", "60"], args=[],
        env={"GREETING": "hello"}, working_dir=None, volumes={"/data": volume}, log_path=tmp_path / "c" / "0.log",
    )  # fmt: skip
    handle = runtime.start(spec)
    yield handle
    handle.kill()
    while handle.poll() is None:
        pass


def test_host_exec_runs_with_the_containers_env_cwd_and_volume_paths(
    sleeping: RunningContainer, tmp_path: Path
) -> None:
    assert sleeping.exec(["sh", "-c", f'test "$GREETING" = hello && test "$(pwd)" = "{tmp_path}"'], 10) == 0
    assert sleeping.exec(["test", "-f", "/data/marker"], 10) == 0  # /data is the volume's host directory
    assert sleeping.exec(["sh", "-c", "exit 3"], 10) == 3
    assert sleeping.exec(["no-such-command-here"], 10) == 127
    with pytest.raises(TimeoutError):
        sleeping.exec(["sleep", "30"], 0.2)
