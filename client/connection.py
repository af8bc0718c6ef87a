"""How every batchd process finds its Redis server, and how it waits when the server is gone.

The URL comes from the caller, else $BATCHD_REDIS_URL, else the local default;
`rediss://` gives TLS and `redis://user:password@host` an ACL user. A master that
Redis Sentinel manages is named by its sentinels and service name:

    redis+sentinel://[user:password@]host:port[,host:port...]/service_name[?db=N]

(`rediss+sentinel://` for TLS to the sentinels and the master). A Redis Cluster is named by
some of its nodes (the rest are found from them):

    redis+cluster://[user:password@]host:port[,host:port...]

(`rediss+cluster://` for TLS), run with request shards (`--shards`, docs/deploy.md). The user and password
are the master's (its ACL user); sentinels that require a password of their own get
`sentinel_username=` / `sentinel_password=` query parameters. Every connection of a
Sentinel client asks the sentinels for the current master when it (re)connects, so a
process follows a failover without a restart (docs/deploy.md). Logs only ever show
the redacted form.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelConnectionPool
from redis.client import PubSub
from redis.sentinel import Sentinel, SentinelConnectionPool

log = logging.getLogger("batchd.client")

DEFAULT_URL = "redis://127.0.0.1:6379/0"
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_SENTINEL_PORT = 26379
# Asking a sentinel for the master must not wait out a daemon's 5-10 s timeouts: a
# sentinel that does not answer within this is skipped for the next one.
SENTINEL_TIMEOUT_S = 1.0
# TLS settings a sentinel URL may carry, as for rediss:// (docs/security.md).
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")

# What a lost or unreachable server raises, sync and asyncio alike (redis-py's sentinel
# errors, MasterNotFoundError included, are ConnectionErrors).
CONNECTION_LOST = (redis.ConnectionError, redis.TimeoutError)


def redis_url(url: str | None = None) -> str:
    return url or os.environ.get("BATCHD_REDIS_URL") or DEFAULT_URL


def redact(url: str) -> str:
    """The URL with its passwords replaced (the master's and the sentinels'), safe to log."""
    url = re.sub(r"([?&][a-z_]*password=)[^&]*", r"\1***", url)
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0] if ":" in credentials else ""
    return f"{scheme}://{user + ':' if user else ''}***@{host}"


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SENTINEL_SCHEMES


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def is_cluster(client) -> bool:
    """Whether a client from open_redis / open_async_redis talks to a Redis Cluster."""
    return isinstance(client, (RedisCluster, AsyncRedisCluster))


@dataclass(frozen=True)
class ClusterAddress:
    """A Redis Cluster, as a redis+cluster:// URL names it: some of its nodes."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_options: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return f"cluster nodes={','.join(f'{host}:{port}' for host, port in self.nodes)} tls={self.tls}"

    def options(self) -> dict:
        options = {"username": self.username, "password": self.password}
        if self.tls:
            options.update(ssl=True, **self.tls_options)
        return options


def parse_cluster_url(url: str) -> ClusterAddress:
    """Read a redis+cluster:// URL; ValueError says what is wrong with it."""
    scheme, parts, username, password, nodes = _split_hosts_url(url, CLUSTER_SCHEMES, "cluster", 6379)
    if not nodes:
        raise ValueError("name at least one cluster node: redis+cluster://host:port[,host:port...]")
    if parts.path.strip("/"):
        raise ValueError("a cluster has one database: drop the path from the redis+cluster:// URL")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = set(query) - set(_TLS_OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; a cluster URL takes "
                         f"{', '.join(_TLS_OPTIONS)}")
    return ClusterAddress(nodes=nodes, username=unquote(username) or None, password=unquote(password) or None,
                          tls=scheme.lower().startswith("rediss"), tls_options=query)


@dataclass(frozen=True)
class SentinelAddress:
    """A Sentinel-managed master, as a redis+sentinel:// URL names it."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: bool = False
    tls_options: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """For a daemon's start line: no passwords."""
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        auth = " sentinel_auth=yes" if self.sentinel_password else ""
        return f"sentinel service={self.service_name} sentinels={hosts} db={self.db} tls={self.tls}{auth}"

    def master_options(self) -> dict:
        options = {"db": self.db, "username": self.username, "password": self.password}
        if self.tls:
            options.update(ssl=True, **self.tls_options)
        return options

    def sentinel_options(self) -> dict:
        options = {"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S,
                   "username": self.sentinel_username, "password": self.sentinel_password}
        if self.tls:
            options.update(ssl=True, **self.tls_options)
        return options


def parse_sentinel_url(url: str) -> SentinelAddress:
    """Read a redis+sentinel:// URL; ValueError says what is wrong with it."""
    scheme, parts, username, password, sentinels = _split_hosts_url(url, SENTINEL_SCHEMES, "Sentinel",
                                                                     DEFAULT_SENTINEL_PORT)
    if not sentinels:
        raise ValueError("name at least one sentinel: redis+sentinel://host:port[,host:port...]/service_name")
    service_name = unquote(parts.path.strip("/"))
    if not service_name or "/" in service_name:
        raise ValueError("the path must be the master's service name, as in sentinel.conf "
                         "(`sentinel monitor NAME ...`): redis+sentinel://host:port/NAME")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = set(query) - {"db", "sentinel_username", "sentinel_password", *_TLS_OPTIONS}
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; a Sentinel URL takes db, "
                         f"sentinel_username, sentinel_password and {', '.join(_TLS_OPTIONS)}")
    try:
        db = int(query.pop("db", "0"))
    except ValueError:
        raise ValueError("db must be a number") from None
    return SentinelAddress(
        sentinels=sentinels, service_name=service_name, db=db,
        username=unquote(username) or None, password=unquote(password) or None,
        sentinel_username=query.pop("sentinel_username", None) or None,
        sentinel_password=query.pop("sentinel_password", None) or None,
        tls=scheme.lower().startswith("rediss"), tls_options=query)


def _split_hosts_url(url: str, schemes: tuple[str, ...], kind: str, default_port: int):
    """A URL naming several hosts (sentinels, cluster nodes): (scheme in lower case, the
    urlsplit parts, user, password, ((host, port), ...))."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in schemes:
        raise ValueError(f"not a {kind} URL (want {' or '.join(s + '://' for s in schemes)})")
    parts = urlsplit("//" + rest)
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    addresses = tuple(_host_port(host, default_port) for host in hosts.split(",") if host)
    return scheme.lower(), parts, username, password, addresses


def _host_port(text: str, default_port: int = DEFAULT_SENTINEL_PORT) -> tuple[str, int]:
    host, colon, port = text.rpartition(":") if not text.endswith("]") else (text, "", "")
    if not colon:
        host, port = text, str(default_port)
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ValueError(f"address {text!r} is not host:port") from None


def describe(url: str) -> str:
    """Where a URL points, safe to log: the redacted URL, and for Sentinel its service and sentinels."""
    if is_sentinel_url(url):
        return f"{redact(url)} ({parse_sentinel_url(url).describe()})"
    if is_cluster_url(url):
        return f"{redact(url)} ({parse_cluster_url(url).describe()})"
    return redact(url)


# Seconds a call of a client opened with wait_for_connection waits for one of its pooled
# connections when all are busy; past it, a transient error (the callers' retry budget).
POOL_WAIT_S = 10.0


def open_redis(url: str | None = None, *, wait_for_connection: bool = False, **options) -> redis.Redis:
    """A client for the URL's server (for Sentinel, whichever server is master now); options
    go to every connection it opens. The one place a batchd process opens Redis.
    wait_for_connection: calls beyond max_connections wait for a free connection instead of
    failing at once with "Too many connections" (the producers' clients: a burst of calls
    larger than the pool is normal there). Sentinel pools do not wait."""
    url = redis_url(url)
    if is_cluster_url(url):
        address = parse_cluster_url(url)
        return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in address.nodes],
                            **address.options(), **_cluster_options(options))
    if not is_sentinel_url(url):
        if wait_for_connection:
            client = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
                url, timeout=POOL_WAIT_S, **options))
            client.auto_close_connection_pool = True  # the pool is the client's own: closed with it
            return client
        return redis.Redis.from_url(url, **options)
    address = parse_sentinel_url(url)
    sentinel = Sentinel(address.sentinels, sentinel_kwargs=address.sentinel_options())
    return sentinel.master_for(address.service_name, **address.master_options(), **options)


def open_async_redis(url: str | None = None, *, wait_for_connection: bool = False, **options) -> aioredis.Redis:
    """open_redis for asyncio."""
    url = redis_url(url)
    if is_cluster_url(url):
        address = parse_cluster_url(url)
        return AsyncRedisCluster(startup_nodes=[AsyncClusterNode(host, port) for host, port in address.nodes],
                                 **address.options(), **_cluster_options(options))
    if not is_sentinel_url(url):
        if wait_for_connection:
            client = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
                url, timeout=POOL_WAIT_S, **options))
            client.auto_close_connection_pool = True  # the pool is the client's own: closed with it
            return client
        return aioredis.Redis.from_url(url, **options)
    address = parse_sentinel_url(url)
    sentinel = AsyncSentinel(address.sentinels, sentinel_kwargs=address.sentinel_options())
    return sentinel.master_for(address.service_name, **address.master_options(), **options)


def _cluster_options(options: dict) -> dict:
    # A cluster client keeps a pool per node and finds the nodes itself; a failover shows as
    # errors its own retries ride out (cluster_error_retry_attempts).
    # Options a cluster client does not take: its connections' health is its own business, and
    # timeouts are retried by its cluster_error_retry_attempts.
    return {k: v for k, v in options.items() if k not in ("health_check_interval", "retry_on_timeout")}


def fleet_shards(client: redis.Redis, keys) -> bytes | None:
    """The shard count the fleet's schedulers published (Keys.fleet_config), or None where
    none did or it cannot be read now (a user without the right to read it, a lost
    connection): a start-up check that must not stop a producer the old layout serves."""
    try:
        return client.hget(keys.fleet_config, "shards")
    except redis.RedisError as error:
        log.debug("could not read the fleet's shard count: %s", error)
        return None


async def fleet_shards_async(client: aioredis.Redis, keys) -> bytes | None:
    """fleet_shards for asyncio."""
    try:
        return await client.hget(keys.fleet_config, "shards")
    except redis.RedisError as error:
        log.debug("could not read the fleet's shard count: %s", error)
        return None


def acl_user(client: redis.Redis | aioredis.Redis) -> str | None:
    """The ACL user a client from open_redis authenticates as (None: the default user)."""
    if is_cluster(client):
        return client.get_connection_kwargs().get("username") or None
    return client.connection_pool.connection_kwargs.get("username") or None


def pubsub_pool(client: redis.Redis, avoid: object = None):
    """The connection pool a Subscription listens on. On a cluster, a node's: a PUBLISH reaches
    every node of a cluster, so one node hears every request's events (docs/deploy.md). Which
    node is picked at random, never `avoid`'s (a pool whose node failed), so a subscriber whose
    node died lands on a live one within a few tries."""
    if isinstance(client, RedisCluster):
        nodes = [node for node in client.get_nodes()
                 if node.redis_connection is not None and node.name != _node_name(avoid)]
        return random.choice(nodes or client.get_nodes()).redis_connection.connection_pool
    return client.connection_pool


async def async_pubsub_pool(client: aioredis.Redis, avoid: object = None):
    """pubsub_pool for asyncio: a pool of its own to one node of a cluster."""
    if isinstance(client, AsyncRedisCluster):
        await client.initialize()
        nodes = [node for node in client.get_nodes() if node.name != _node_name(avoid)] or client.get_nodes()
        node = random.choice(nodes)
        options = {k: v for k, v in node.connection_kwargs.items() if k not in ("host", "port")}
        return aioredis.ConnectionPool(host=node.host, port=node.port, **options)
    return client.connection_pool


def master_client(client: RedisCluster, key: str) -> redis.Redis:
    """A plain client of the cluster master that holds a key's slot now. WAIT counts the writes of
    the connection it runs on, so a durable write goes through this (one pipeline: the write,
    then WAIT) rather than through the cluster client, which sends a keyless WAIT to any node."""
    return client.get_node_from_key(key).redis_connection


def node_of(cluster: RedisCluster | AsyncRedisCluster, key: str) -> str | None:
    """The name of the master a key's slot is routed to now (None: no node covers it yet)."""
    try:
        return cluster.get_node_from_key(key).name
    except Exception:  # redis-py's SlotNotCoveredError is no RedisError
        return None


def relearn_slots(client: RedisCluster) -> None:
    """Ask the cluster where every slot lives now. For a write sent to a master directly
    (master_client), which follows no redirection and refreshes nothing: after a MOVED, and
    after its connection failed, since a master killed under it is replaced by a replica that
    only a fresh slot table names (the cluster client's own commands refresh it on such errors,
    but a daemon whose failing call is always the direct write would retry the dead master for
    ever). A node that cannot answer now is skipped; the caller's retry asks again."""
    try:
        client.nodes_manager.initialize()
    except (redis.RedisError, OSError) as error:
        log.debug("could not refresh the cluster's slot table yet: %s", error)


async def relearn_slots_async(client: AsyncRedisCluster) -> None:
    """relearn_slots for asyncio."""
    try:
        await client.nodes_manager.initialize()
    except (redis.RedisError, OSError) as error:
        log.debug("could not refresh the cluster's slot table yet: %s", error)


class AsyncMasterClients:
    """master_client for asyncio: a plain client per cluster master, made on first use and
    closed with its owner (an asyncio cluster node has no client of its own to lend)."""

    def __init__(self, cluster: AsyncRedisCluster):
        self._cluster = cluster
        self._clients: dict[str, aioredis.Redis] = {}

    async def of(self, key: str) -> aioredis.Redis:
        await self._cluster.initialize()
        node = self._cluster.get_node_from_key(key)
        if node.name not in self._clients:
            # The node's connection settings, less the cluster client's own bookkeeping.
            accepted = inspect.signature(aioredis.Redis).parameters
            options = {k: v for k, v in node.connection_kwargs.items() if k in accepted and k not in ("host", "port")}
            self._clients[node.name] = aioredis.Redis(host=node.host, port=node.port, **options)
        return self._clients[node.name]

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


def is_moved(reply: object) -> bool:
    """A reply saying a slot lives on another node now: the caller refreshes its slot table and
    tries again (a plain client of one master does not follow MOVED or ASK itself)."""
    # redis-py parses both into errors whose text is only "<slot> <host:port>".
    return isinstance(reply, (redis.exceptions.MovedError, redis.exceptions.AskError)) or \
        isinstance(reply, redis.ResponseError) and str(reply).startswith(("MOVED", "ASK"))


def _node_name(pool: object) -> str | None:
    """"host:port" of a pool's server (a cluster node's name), None for none."""
    kwargs = getattr(pool, "connection_kwargs", None)
    return f"{kwargs.get('host')}:{kwargs.get('port')}" if kwargs else None


def close_redis(client: redis.Redis) -> None:
    """Close a client from open_redis and, for Sentinel, its connections to the sentinels."""
    client.close()
    if isinstance(getattr(client, "connection_pool", None), SentinelConnectionPool):
        client.connection_pool.sentinel_manager.close()


async def close_async_redis(client: aioredis.Redis) -> None:
    """close_redis for asyncio."""
    await client.aclose()
    if isinstance(getattr(client, "connection_pool", None), AsyncSentinelConnectionPool):
        await client.connection_pool.sentinel_manager.aclose()


def connect(url: str | None = None, **options) -> redis.Redis:
    """A daemon's command connection: bounded timeouts so a dead server is noticed."""
    options.setdefault("socket_timeout", 10)
    options.setdefault("socket_connect_timeout", 5)
    options.setdefault("health_check_interval", 30)
    return open_redis(url, **options)


class Backoff:
    """Delays between tries at a lost connection: 0.1 s, doubling up to cap_s."""

    FIRST_S = 0.1

    def __init__(self, cap_s: float):
        self.cap_s = cap_s
        self._next = self.FIRST_S

    def next_delay(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.cap_s)
        return delay

    def reset(self) -> None:
        self._next = self.FIRST_S


class Subscription(PubSub):
    """A PubSub that notes every (re)connect. redis-py reconnects and resubscribes silently,
    and whatever was published while the connection was down is lost: a reader that sees
    `reconnected` looks up what it may have missed, then clears it."""

    reconnected = False

    def on_connect(self, connection) -> None:
        self.reconnected = True
        super().on_connect(connection)
