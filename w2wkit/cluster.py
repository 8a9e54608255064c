"""One way to say "use a cluster": ``local:N``, ``tcp://HOST:PORT``, a scheduler file, a Client.

Every command that can scale out (``fit``, ``train``) takes the same ``--cluster`` value and every
API function the same ``client=`` argument; this module turns either into a
``dask.distributed.Client``; nothing else in w2wkit connects to a scheduler. Dask is imported only
when a cluster is asked for, so a single-machine run never needs it (it lives in the ``cluster``
extra). Dask's own configuration (``~/.config/dask/*.yaml`` or ``DASK_*`` variables: TLS, timeouts,
worker resources) applies unchanged.

Specification forms
-------------------
``local:N``
    A ``LocalCluster`` of N worker processes with one thread each, bound to 127.0.0.1 only (its
    dashboard too, on a free port). It lives as long as the command.
``tcp://HOST:PORT`` (or ``tls://``, ``ucx://``, ``inproc://``)
    An existing scheduler's address; the cluster is not closed afterwards.
``PATH``
    A scheduler file written by ``dask scheduler --scheduler-file PATH`` (dask-jobqueue and
    dask-mpi write these too).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from w2wkit.errors import W2WError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from distributed import Client

__all__ = [
    "ClusterError",
    "ClusterSpec",
    "dashboard_link",
    "open_client",
    "parse_cluster",
    "require_dask",
    "worker_count",
]

#: Seconds to wait for a scheduler before saying it cannot be reached.
CONNECT_TIMEOUT = 10.0
_ADDRESS = re.compile(r"^(tcp|tls|ucx|inproc)://\S+$")
_LOCAL = re.compile(r"^local(?::(\d+))?$")


class ClusterError(W2WError):
    """The cluster asked for cannot be used (unreachable, missing file, dask not installed)."""


@dataclass(frozen=True)
class ClusterSpec:
    """A parsed ``--cluster`` value.

    Attributes
    ----------
    kind : {"local", "address", "file"}
        Which of the three forms it is.
    workers : int
        Worker processes of a ``local`` cluster (0 for the other kinds).
    target : str
        The scheduler address, or the scheduler file's path.
    """

    kind: str
    workers: int = 0
    target: str = ""

    def describe(self) -> str:
        """The spec as a person reads it (``local:2``, the address or the file)."""
        return f"local:{self.workers}" if self.kind == "local" else self.target


def parse_cluster(value: str) -> ClusterSpec:
    """Parse a ``--cluster`` value; raise :class:`ClusterError` when it is none of the forms.

    Parameters
    ----------
    value : str
        ``local:N``, a scheduler address (``tcp://HOST:PORT``) or a scheduler file's path.

    Returns
    -------
    ClusterSpec
        The parsed form. A file is not opened here (see :func:`open_client`).
    """
    text = str(value).strip()
    local = _LOCAL.match(text)
    if local:
        workers = int(local.group(1)) if local.group(1) else (os.cpu_count() or 1)
        if workers < 1:
            raise ClusterError(
                f"'{text}' asks for no workers", param="cluster", hint="use local:N with N >= 1"
            )
        return ClusterSpec("local", workers=workers)
    if text.startswith("local:"):
        raise ClusterError(
            f"'{text}' is not local:N", param="cluster", hint="use local:N with N >= 1"
        )
    if _ADDRESS.match(text):
        return ClusterSpec("address", target=text)
    if "://" in text or not text:
        raise ClusterError(
            f"'{text}' is not a cluster",
            param="cluster",
            hint="use local:N, tcp://HOST:PORT or a scheduler file's path",
        )
    return ClusterSpec("file", target=text)


def require_dask() -> None:
    """Raise :class:`ClusterError` with the install command when ``dask.distributed`` is missing."""
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        raise ClusterError(
            "a cluster was asked for but dask.distributed is not installed",
            param="cluster",
            hint='pip install "w2wkit[cluster]"',
        ) from exc


def _quiet_dask_logs() -> None:
    """Keep the scheduler's and workers' INFO chatter off the user's terminal."""
    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.worker"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def open_client(
    cluster: str | ClusterSpec | Client | None,
    *,
    timeout: float = CONNECT_TIMEOUT,
    resources: dict[str, float] | None = None,
) -> Iterator[Client | None]:
    """Yield a ``dask.distributed.Client`` for ``cluster``, or None when no cluster is asked for.

    Parameters
    ----------
    cluster : str, ClusterSpec, Client or None
        A ``--cluster`` value, its parsed form, a Client the caller owns (yielded as is and left
        open), or None (yields None; dask is not imported).
    timeout : float
        Seconds to wait for a remote scheduler.
    resources : dict, optional
        Worker resources of a ``local`` cluster (e.g. ``{"GPU": 1}``); remote workers declare
        their own with ``dask worker --resources``.

    Yields
    ------
    Client or None
        Closed on exit when this function made it (and the ``local`` cluster with it).

    Raises
    ------
    ClusterError
        Dask missing, the scheduler unreachable within ``timeout``, or the scheduler file missing
        or unreadable: one line naming the address or the file.
    """
    if cluster is None:
        yield None
        return
    if not isinstance(cluster, (str, ClusterSpec)):
        yield cluster  # a Client the caller made and owns
        return
    spec = cluster if isinstance(cluster, ClusterSpec) else parse_cluster(cluster)
    require_dask()
    from distributed import Client, LocalCluster

    _quiet_dask_logs()
    if spec.kind == "local":
        local = LocalCluster(
            n_workers=spec.workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            resources=resources,
            # a task's error reaches the caller as one line; the workers' own log of it
            # (a traceback per failed task) would only repeat it on the terminal
            silence_logs=logging.CRITICAL,
        )
        try:
            with Client(local) as client:
                yield client
        finally:
            local.close()
        return
    if spec.kind == "file":
        path = Path(spec.target)
        if not path.is_file():
            raise ClusterError(
                "scheduler file not found",
                path=path,
                hint="the dask scheduler writes it when started with a scheduler file; "
                "local:N and tcp://HOST:PORT need none",
            )
        kwargs: dict[str, Any] = {"scheduler_file": str(path)}
        where = str(path)
    else:
        kwargs = {"address": spec.target}
        where = spec.target
    try:
        client = Client(timeout=timeout, **kwargs)
    except (OSError, TimeoutError, ValueError, KeyError) as exc:
        what = str(exc).split("\n")[0] or type(exc).__name__
        raise ClusterError(
            f"cannot reach the dask scheduler at {where} within {timeout:g} s ({what})",
            param="cluster",
        ) from exc
    try:
        yield client
    finally:
        client.close()


def dashboard_link(client: Client | None) -> str | None:
    """The scheduler's dashboard address, or None (no client, or no dashboard)."""
    if client is None:
        return None
    try:
        return str(client.dashboard_link)
    except Exception:  # the dashboard is optional (bokeh may be missing)
        return None


def worker_count(client: Client) -> int:
    """How many workers the scheduler knows of now."""
    return len(client.scheduler_info().get("workers", {}))
