"""Real PostgreSQL and MLflow tracking servers for the tests, on 127.0.0.1 and free ports only.

PostgreSQL is Debian's (`./setup.sh --test` installs it): a fresh cluster is made by `initdb` in
a temporary folder and started with `pg_ctl`; as root both run as the `postgres` system user
(PostgreSQL refuses to run as root). MLflow is the mlflow package's own `mlflow server`, its
backend store in that PostgreSQL and its artifacts proxied into a temporary folder. Both are
stopped by `Servers.stop`, which never raises.

When a server cannot be had, `ServerUnavailableError` says why: the tests skip with that reason,
except under CI (env CI=true), where they fail.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
PG_USER = "postgres"
PG_TOOLS = ("initdb", "pg_ctl", "postgres")
# Environment of the MLflow server and of every client the tests start: no usage telemetry
# (it would leave the machine), and no job runner (a flock of processes the tests never use).
QUIET_MLFLOW_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}
_START_ATTEMPTS = 3


class ServerUnavailableError(RuntimeError):
    """A server the tests need cannot be installed or started here; the message says why."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def postgres_bindir() -> Path:
    """The folder holding initdb, pg_ctl and postgres: on PATH, else Debian's newest."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).resolve().parent] if on_path else []

    def version(folder: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", folder.parent.name))

    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for folder in [*candidates, *debian]:
        if all(os.access(folder / tool, os.X_OK) for tool in PG_TOOLS):
            return folder
    raise ServerUnavailableError(
        "PostgreSQL is not installed (no initdb, pg_ctl and postgres on PATH or in "
        "/usr/lib/postgresql/*/bin); `./setup.sh --test` installs Debian's postgresql as root"
    )


def check_postgres_driver() -> None:
    """The Python driver that SQLAlchemy uses for a plain postgresql:// URL must import."""
    import sqlalchemy

    driver = sqlalchemy.engine.make_url("postgresql://").get_dialect().driver
    if importlib.util.find_spec(driver) is None:
        raise ServerUnavailableError(
            f"the PostgreSQL driver {driver!r} for SQLAlchemy {sqlalchemy.__version__} is not "
            f"installed; `./setup.sh --test` installs it (the `distributed` extra)"
        )


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Postgres:
    """A throw-away PostgreSQL cluster listening on 127.0.0.1:`port` only, user `postgres`."""

    bindir: Path
    folder: Path
    port: int = 0
    as_postgres: bool = False

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "postgres.log"

    def url(self, database: str) -> str:
        return f"postgresql://{PG_USER}@{HOST}:{self.port}/{database}"

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", PG_USER, "--", *args] if self.as_postgres else list(args)

    def _run(self, *args: str, timeout: float = 120) -> None:
        try:
            done = subprocess.run(self._cmd(*args), capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ServerUnavailableError(f"{Path(args[0]).name} failed: {exc}") from None
        if done.returncode != 0:
            raise ServerUnavailableError(
                f"{Path(args[0]).name} exited {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[-1500:]}\n{_tail(self.log)}"
            )

    @classmethod
    def start(cls) -> Postgres:
        bindir = postgres_bindir()
        check_postgres_driver()
        as_postgres = os.geteuid() == 0
        if as_postgres and shutil.which("runuser") is None:
            raise ServerUnavailableError("running as root, but `runuser` is missing")
        # Not under pytest's tmp folder: that is private to root, and the cluster is not.
        folder = Path(tempfile.mkdtemp(prefix="protobench-pg-"))
        server = cls(bindir, folder, as_postgres=as_postgres)
        try:
            if as_postgres:
                try:
                    shutil.chown(folder, PG_USER, PG_USER)
                except (LookupError, OSError) as exc:
                    raise ServerUnavailableError(
                        f"running as root, but the {PG_USER!r} system user is unusable: {exc}"
                    ) from None
            server._run(str(bindir / "initdb"), "-D", str(server.data), "-U", PG_USER,
                        "-A", "trust", "-E", "UTF8", "--no-sync")
            server._listen()
        except BaseException:
            server.stop()
            raise
        return server

    def _listen(self) -> None:
        last: Exception | None = None
        for _ in range(_START_ATTEMPTS):
            self.port = free_port()  # another program may take it first: then try another
            options = f"-h {HOST} -p {self.port} -k {self.folder} -F"
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                          str(self.log), "-o", options, "-w", "-t", "60", "start")
                return
            except ServerUnavailableError as exc:
                last = exc
        raise ServerUnavailableError(f"PostgreSQL did not start: {last}")

    def create_database(self, name: str) -> str:
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        finally:
            engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        if self.port and (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                subprocess.run(
                    self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m",
                              "immediate", "-w", "-t", "30", "stop"),
                    capture_output=True, timeout=60, check=False,
                )
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class MlflowServer:
    """`mlflow server` on 127.0.0.1:`port`, in a process group of its own."""

    port: int
    artifacts: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @classmethod
    def launch(cls, backend_uri: str, folder: Path) -> MlflowServer:
        """Start the server without waiting for it (it takes half a minute); see `wait`."""
        artifacts = folder / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        server = cls(free_port(), artifacts, folder / "mlflow-server.log")
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", backend_uri,
            "--serve-artifacts", "--artifacts-destination", str(artifacts),
            "--host", HOST, "--port", str(server.port), "--workers", "1",
        ]
        with open(server.log, "wb") as log:
            server.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **QUIET_MLFLOW_ENV}, start_new_session=True,
            )
        return server

    def wait(self, timeout: float = 180) -> None:
        """Wait until /health answers; the server's first API call is slow, so make it here."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is None or self.process.poll() is not None:
                raise ServerUnavailableError(f"mlflow server exited:\n{_tail(self.log)}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerUnavailableError(
                    f"mlflow server gave no /health within {timeout:.0f} s:\n{_tail(self.log)}")
            time.sleep(0.25)
        request = urllib.request.Request(
            f"{self.url}/api/2.0/mlflow/experiments/search", data=b'{"max_results": 1}',
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read()

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=3)  # a graceful stop waits for idle clients: not worth it
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # and uvicorn's worker, should it linger
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)


@dataclass
class Servers:
    """PostgreSQL with databases `optuna` and `mlflow`, and MLflow's server on the latter."""

    postgres: Postgres
    mlflow: MlflowServer
    optuna_url: str
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @classmethod
    def start(cls, folder: Path) -> Servers:
        with contextlib.ExitStack() as stack:
            postgres = Postgres.start()
            stack.callback(postgres.stop)
            backend = postgres.create_database("mlflow")
            mlflow = MlflowServer.launch(backend, folder)
            stack.callback(lambda: mlflow.stop())
            optuna_url = postgres.create_database("optuna")  # while MLflow starts up
            for attempt in range(_START_ATTEMPTS):
                try:
                    mlflow.wait()
                    break
                except ServerUnavailableError:
                    # Another program took the free port first: try another one.
                    if attempt + 1 == _START_ATTEMPTS or "already in use" not in _tail(mlflow.log):
                        raise
                    mlflow = MlflowServer.launch(backend, folder)
            return cls(postgres, mlflow, optuna_url, stack.pop_all())
        raise AssertionError("unreachable")  # for mypy: ExitStack may swallow exceptions

    def stop(self) -> None:
        self.stack.close()
