"""``--cluster`` values and ``client=``: parsing, a loopback LocalCluster, the clear failures."""

from __future__ import annotations

import socket

import pytest

from w2wkit.cluster import ClusterError, ClusterSpec, open_client, parse_cluster, worker_count


def test_parse_forms() -> None:
    assert parse_cluster("local:3") == ClusterSpec("local", workers=3)
    assert parse_cluster("tcp://10.0.0.5:8786") == ClusterSpec(
        "address", target="tcp://10.0.0.5:8786"
    )
    assert parse_cluster("sched.json") == ClusterSpec("file", target="sched.json")
    assert parse_cluster("local").workers >= 1


@pytest.mark.parametrize("bad", ["local:0", "http://x:1", "", "local:-2"])
def test_parse_refuses(bad: str) -> None:
    with pytest.raises(ClusterError, match="parameter cluster"):
        parse_cluster(bad)


def test_none_imports_nothing() -> None:
    with open_client(None) as client:
        assert client is None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_scheduler_is_one_line() -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(ClusterError) as info:
        with open_client(address, timeout=1.0):
            pass
    message = str(info.value)
    assert address in message and "\n" not in message


def test_missing_scheduler_file(tmp_path) -> None:
    path = tmp_path / "nowhere.json"
    with pytest.raises(ClusterError, match="scheduler file not found") as info:
        with open_client(str(path)):
            pass
    assert str(path) in str(info.value)


@pytest.mark.slow
def test_local_cluster_on_loopback() -> None:
    with open_client("local:2") as client:
        assert worker_count(client) == 2
        addresses = list(client.scheduler_info()["workers"])
        assert all(a.startswith("tcp://127.0.0.1:") for a in addresses)
        assert client.submit(sum, [1, 2, 3]).result() == 6
        # a Client passed in is used as is and left open
        with open_client(client) as same:
            assert same is client
        assert client.submit(abs, -2).result() == 2
