"""The kubelet's HTTPS API as the node agent serves it: what ``kubectl logs`` reaches through the API server.

The API server connects to the Node's ``status.daemonEndpoints.kubeletEndpoint.Port`` at its
``InternalIP`` with its kubelet client certificate (``--kubelet-client-certificate``) and checks this
server's certificate against ``--kubelet-certificate-authority``. Requests are handled as a kubelet
with ``--anonymous-auth=false --client-ca-file=CA --authorization-mode=Webhook`` handles them:

- Authentication: a client certificate signed by the cluster CA; its CN is the user, its O entries
  the groups. No certificate: ``401 Unauthorized``. A certificate from another CA fails the TLS
  handshake (Python's ``ssl`` verifies a presented certificate during the handshake, where Go's
  kubelet verifies it afterwards and answers 401): either way the request never reaches a handler.
- Authorization: a SubjectAccessReview to the API server with the kubelet's attributes (verb from
  the HTTP method, resource ``nodes``, subresource ``log`` for ``/logs/``, ``proxy`` for everything
  else, so ``/containerLogs`` is ``nodes/proxy``; name the node's). Denied: ``403 Forbidden``.

Only ``GET /containerLogs/{namespace}/{pod}/{container}`` is served, with kubectl's query
parameters ``follow``, ``previous``, ``tailLines`` and ``limitBytes``. The agent writes a
container's output as it comes, without a timestamp per line, so ``timestamps``, ``sinceSeconds``
and ``sinceTime`` are answered ``400 Bad Request`` saying so, rather than with a made-up answer.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Protocol

logger = logging.getLogger("localcluster.kubelet_api")

FOLLOW_POLL_SECONDS = 0.1
READ_BLOCK = 64 * 1024
UNSUPPORTED_PARAMETERS = ("timestamps", "sinceSeconds", "sinceTime")


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...]


@dataclass(frozen=True)
class Attributes:
    """What a kubelet asks the API server about one request (a SubjectAccessReview's resourceAttributes)."""

    verb: str
    resource: str
    subresource: str
    name: str


class LogError(Exception):
    """The logs cannot be served: ``status`` and the kubelet's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ContainerLog:
    """One container instance's log file, and whether more may still be written to it."""

    path: Path
    still_running: Callable[[], bool]


class LogSource(Protocol):
    def container_log(self, namespace: str, pod: str, container: str, *, previous: bool) -> ContainerLog:
        """The log of the current (or previous) instance of the container; LogError if there is none."""


Authorizer = Callable[[User, Attributes], tuple[bool, str]]


def request_attributes(method: str, path: str, node_name: str) -> Attributes:
    """The kubelet's mapping of a request onto ``nodes/<subresource>`` (server/auth.go)."""
    verb = {"GET": "get", "HEAD": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
    subresource = "proxy"
    for prefix, sub in (("/stats", "stats"), ("/metrics", "metrics"), ("/logs", "log"), ("/spec", "spec")):
        if path == prefix or path.startswith(prefix + "/"):
            subresource = sub
    return Attributes(verb=verb.get(method, method.lower()), resource="nodes", subresource=subresource, name=node_name)


def peer_user(certificate: object) -> User | None:
    """The user of a verified client certificate (``getpeercert()``): CN as name, O entries as groups."""
    if not isinstance(certificate, dict) or not certificate.get("subject"):
        return None
    name = ""
    groups: list[str] = []
    for rdn in certificate["subject"]:
        for key, value in rdn:
            if key == "commonName":
                name = str(value)
            elif key == "organizationName":
                groups.append(str(value))
    return User(name, tuple(groups)) if name else None


def tail_offset(path: Path, lines: int) -> int:
    """The byte offset where the last ``lines`` lines of the file start (reading backwards in blocks)."""
    with path.open("rb") as f:
        end = f.seek(0, 2)
        if lines <= 0:
            return end
        position = end
        newlines = 0
        # A final newline ends the last line rather than starting an empty one.
        f.seek(max(end - 1, 0))
        skip_last = end > 0 and f.read(1) == b"\n"
        while position > 0:
            start = max(position - READ_BLOCK, 0)
            f.seek(start)
            block = f.read(position - start)
            for index in range(len(block) - 1, -1, -1):
                if block[index : index + 1] != b"\n":
                    continue
                if skip_last and start + index == end - 1:
                    continue
                newlines += 1
                if newlines == lines:
                    return start + index + 1
            position = start
        return 0


def read_log(log: ContainerLog, *, follow: bool, tail_lines: int | None, limit_bytes: int | None) -> Iterator[bytes]:
    """The log's bytes from the tail offset on; with ``follow``, until its container has exited."""
    try:
        offset = 0 if tail_lines is None else tail_offset(log.path, tail_lines)
    except FileNotFoundError:
        return
    remaining = limit_bytes
    with log.path.open("rb") as f:
        f.seek(offset)
        while True:
            running = log.still_running()  # before reading: what it wrote until it exited is read
            while chunk := f.read(READ_BLOCK if remaining is None else min(READ_BLOCK, remaining)):
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
                if remaining == 0:
                    return
            if not follow or not running:
                return
            time.sleep(FOLLOW_POLL_SECONDS)  # a handler thread of its own, never the agent's


def _optional_int(query: dict[str, list[str]], name: str) -> int | None:
    values = query.get(name)
    if not values or values[-1] == "":
        return None
    try:
        value = int(values[-1])
    except ValueError:
        raise LogError(400, f"invalid {name} {values[-1]!r}: not an integer") from None
    if value < 0:
        raise LogError(400, f"invalid {name} {value}: must be non-negative")
    return value


def _flag(query: dict[str, list[str]], name: str) -> bool:
    values = query.get(name) or [""]
    return values[-1].lower() in ("true", "1")


class _Handler(BaseHTTPRequestHandler):
    server: KubeletServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def _error(self, status: int, message: str) -> None:
        body = (message + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authorized(self, path: str) -> bool:
        connection = self.connection
        certificate = connection.getpeercert() if isinstance(connection, ssl.SSLSocket) else None
        user = peer_user(certificate)
        if user is None:
            self._error(401, "Unauthorized")
            return False
        attributes = request_attributes(self.command, path, self.server.node_name)
        try:
            allowed, reason = self.server.authorize(user, attributes)
        except Exception as e:  # the API server unreachable: the kubelet answers 500 as well
            logger.warning("SubjectAccessReview for %s failed: %s", user.name, e)
            self._error(500, "Authorization error")
            return False
        if not allowed:
            message = (
                f"Forbidden (user={user.name}, verb={attributes.verb}, resource={attributes.resource}, "
                f"subresource={attributes.subresource})"
            )
            self._error(403, message + (f": {reason}" if reason else ""))
            return False
        return True

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if not self._authorized(url.path):
            return
        parts = url.path.strip("/").split("/")
        if len(parts) != 4 or parts[0] != "containerLogs" or not all(parts):
            self._error(404, "404 page not found")
            return
        _, namespace, pod, container = (urllib.parse.unquote(p) for p in parts)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        try:
            for name in UNSUPPORTED_PARAMETERS:
                if name in query and (name != "timestamps" or _flag(query, name)):
                    raise LogError(400, f"{name} is not supported by this node agent: it keeps no per-line timestamps")
            tail_lines = _optional_int(query, "tailLines")
            limit_bytes = _optional_int(query, "limitBytes")
            log = self.server.logs.container_log(namespace, pod, container, previous=_flag(query, "previous"))
        except LogError as e:
            self._error(e.status, str(e))
            return
        chunks = read_log(log, follow=_flag(query, "follow"), tail_lines=tail_lines, limit_bytes=limit_bytes)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in chunks:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True  # the client went away (kubectl logs -f interrupted)

    do_HEAD = do_GET


class KubeletServer(ThreadingHTTPServer):
    """The HTTPS server on ``host:port`` (0: a free port, see ``port``); `serve_in_thread` starts it."""

    daemon_threads = True

    def __init__(
        self,
        *,
        node_name: str,
        cert_file: Path,
        key_file: Path,
        client_ca_file: Path,
        authorize: Authorizer,
        logs: LogSource,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__((host, port), _Handler)
        self.node_name = node_name
        self.authorize = authorize
        self.logs = logs
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(cert_file), str(key_file))
        context.load_verify_locations(cafile=str(client_ca_file))
        context.verify_mode = ssl.CERT_OPTIONAL  # no certificate: 401 from the handler, as the kubelet
        # The handshake happens in each request's thread, so a slow client never stalls accept().
        self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def handle_error(self, request: object, client_address: object) -> None:
        # A refused handshake (no or a foreign client certificate) is the point, not a crash.
        logger.info("kubelet API: connection from %s ended with an error", client_address, exc_info=True)

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="kubelet-api", daemon=True)
        thread.start()
        return thread
