"""Prometheus metrics of the scheduler and the worker daemons.

Where batchd uses a vLLM name it keeps vLLM's meaning and labels (`model_name`,
`finished_reason`), under the `batchd:` prefix, so a vLLM dashboard or alert
matches once its prefix is changed; what vLLM has no name for gets its own
(the fleet backlog is `batchd:num_requests_queued`, not vLLM's engine queue).
Labels are bounded sets (worker, model_name, finished_reason, error_type,
priority); never a request id. deploy/grafana and deploy/prometheus refer only
to names defined here (tested).
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from batchd.client.errors import ERROR_CODES, CannotListen
from batchd.client.protocol import FINISH_REASONS

# One registry per daemon role, so a worker's /metrics carries no scheduler
# series (and the reverse) and dashboards need no job filters to stay exact.
SCHEDULER_REGISTRY = CollectorRegistry()
WORKER_REGISTRY = CollectorRegistry()
GATEWAY_REGISTRY = CollectorRegistry()

# LLM latencies span milliseconds (a cached short prompt) to minutes (long
# generations); buckets follow vLLM's spread.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
               0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0,
               15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                0.2, 0.5, 1.0, 2.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

WORKER = ("worker", "model_name")

# -- scheduler -------------------------------------------------------------
requests_queued = Gauge(
    "batchd:num_requests_queued",
    "Requests submitted and not yet dispatched to a worker (stream backlog plus pending batches).", registry=SCHEDULER_REGISTRY)
requests_queued_by_tenant = Gauge(
    "batchd:num_requests_queued_by_tenant",
    "The same, for each request stream: a tenant's own (docs/protocol.md, \"Tenants\"), or \"\" the shared one.",
    ("tenant",), registry=SCHEDULER_REGISTRY)
requests_received = Counter(
    "batchd:requests_received_total", "Requests read from the request stream, by the model they name "
    "(\"\": the fleet's only model).", ("priority", "model_name"), registry=SCHEDULER_REGISTRY)
jobs_dispatched = Counter(
    "batchd:jobs_dispatched_total", "Jobs (batches) sent to workers.", registry=SCHEDULER_REGISTRY)
job_size = Histogram(
    "batchd:job_size_requests", "Requests per dispatched job.", buckets=SIZE_BUCKETS, registry=SCHEDULER_REGISTRY)
batch_wait = Histogram(
    "batchd:scheduler_batch_wait_seconds",
    "Time from a batch's first request to its dispatch.", buckets=WAIT_BUCKETS, registry=SCHEDULER_REGISTRY)
requests_rejected = Counter(
    "batchd:requests_rejected_total",
    "Requests the scheduler answered with an error before dispatch.", ("error_type",), registry=SCHEDULER_REGISTRY)
requests_overloaded = Counter(
    "batchd:requests_overloaded_total",
    "Submits refused with Overloaded (max_queue reached), by tenant (\"\": the shared request stream). "
    "Counted in Redis by the producers' SUBMIT function in one counter per tenant, plus the entries a "
    "tenant queued past max_queue by raw XADD, which a scheduler answers; each scheduler exports what it "
    "took, so sum over schedulers.", ("tenant",), registry=SCHEDULER_REGISTRY)
requests_reclaimed = Counter(
    "batchd:requests_reclaimed_total",
    "Requests taken back from a dead worker (or scheduler) and dispatched again.", registry=SCHEDULER_REGISTRY)
dead_letters = Counter(
    "batchd:dead_letters_total", "Requests moved to the dead-letter stream.", ("error_type",), registry=SCHEDULER_REGISTRY)
live_workers = Gauge(
    "batchd:live_workers", "Workers whose heartbeat has not expired.", registry=SCHEDULER_REGISTRY)
free_slots = Gauge(
    "batchd:free_slots", "Engine slots of the live workers that no request holds or waits for.",
    registry=SCHEDULER_REGISTRY)
total_slots = Gauge(
    "batchd:total_slots", "Engine slots of the live workers, in total.", registry=SCHEDULER_REGISTRY)
unread_shards = Gauge(
    "batchd:unread_shards", "Request shards no scheduler has read for 10 s (schedulers started with "
    "--read-shards that leave a shard out): its requests wait until one does.", registry=SCHEDULER_REGISTRY)

# -- worker -----------------------------------------------------------------
requests_running = Gauge(
    "batchd:num_requests_running", "Requests holding a slot in the engine.", WORKER, registry=WORKER_REGISTRY)
requests_waiting = Gauge(
    "batchd:num_requests_waiting",
    "Requests in the engine's own queue, waiting for a slot (vLLM's meaning).", WORKER, registry=WORKER_REGISTRY)
kv_cache_usage = Gauge(
    "batchd:kv_cache_usage_perc", "Fraction of the KV cache in use (0-1).", WORKER, registry=WORKER_REGISTRY)
pinned_blocks = Gauge(
    "batchd:kv_cache_pinned_blocks", "KV blocks held by pinned prefixes (never evicted while pinned).", WORKER,
    registry=WORKER_REGISTRY)
step_batch_size = Histogram(
    "batchd:step_batch_size", "Live slots per engine step.", WORKER, buckets=SIZE_BUCKETS, registry=WORKER_REGISTRY)
engine_step_duration = Histogram(
    "batchd:engine_step_duration_seconds",
    "Wall time of one engine step as the worker sees it.", WORKER, buckets=STEP_BUCKETS, registry=WORKER_REGISTRY)
engine_device_wait = Counter(
    "batchd:engine_device_wait_seconds_total",
    "Time engine steps spent blocked reading results back from the accelerator.", WORKER, registry=WORKER_REGISTRY)
time_to_first_token = Histogram(
    "batchd:time_to_first_token_seconds",
    "From submission to the first token.", WORKER, buckets=TTFT_BUCKETS, registry=WORKER_REGISTRY)
inter_token_latency = Histogram(
    "batchd:inter_token_latency_seconds",
    "Between consecutive tokens of one request.", WORKER, buckets=ITL_BUCKETS, registry=WORKER_REGISTRY)
e2e_latency = Histogram(
    "batchd:e2e_request_latency_seconds",
    "From submission to the final result.", WORKER, buckets=E2E_BUCKETS, registry=WORKER_REGISTRY)
queue_time = Histogram(
    "batchd:request_queue_time_seconds",
    "From submission to admission into a worker's engine.", WORKER, buckets=E2E_BUCKETS, registry=WORKER_REGISTRY)
prefill_time = Histogram(
    "batchd:request_prefill_time_seconds",
    "From admission into the engine to the request's first token.", WORKER, buckets=E2E_BUCKETS,
    registry=WORKER_REGISTRY)
decode_time = Histogram(
    "batchd:request_decode_time_seconds",
    "From a request's first token to its last.", WORKER, buckets=E2E_BUCKETS, registry=WORKER_REGISTRY)
prompt_tokens = Counter(
    "batchd:prompt_tokens_total", "Prefilled prompt tokens.", WORKER, registry=WORKER_REGISTRY)
generation_tokens = Counter(
    "batchd:generation_tokens_total", "Generated tokens.", WORKER, registry=WORKER_REGISTRY)
requests_finished = Counter(
    "batchd:request_success_total",
    "Requests finished, by finished_reason (stop, length, cancelled, deadline, error).",
    WORKER + ("finished_reason",), registry=WORKER_REGISTRY)
request_errors = Counter(
    "batchd:request_errors_total", "Requests that ended in an error, by type.", WORKER + ("error_type",), registry=WORKER_REGISTRY)
preemptions = Counter(
    "batchd:num_preemptions_total", "Requests preempted and re-queued for lack of cache.", WORKER, registry=WORKER_REGISTRY)
prefix_cache_queries = Counter(
    "batchd:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.", WORKER, registry=WORKER_REGISTRY)
prefix_cache_hits = Counter(
    "batchd:prefix_cache_hits_total", "Prompt tokens found in the prefix cache (not computed again).", WORKER,
    registry=WORKER_REGISTRY)
prompt_tokens_computed = Counter(
    "batchd:prompt_tokens_computed_total", "Prompt tokens the engine computed (prefilled).", WORKER,
    registry=WORKER_REGISTRY)
heartbeats = Counter(
    "batchd:worker_heartbeats_total", "Heartbeats a worker sent.", WORKER, registry=WORKER_REGISTRY)
results_fenced = Counter(
    "batchd:results_fenced_total",
    "Final results refused because another worker attempt owns the request.", WORKER, registry=WORKER_REGISTRY)


# What a worker is doing, from the moment its process starts: loading a model can take
# a minute, and a worker that answers scrapes meanwhile is loading, not down.
WORKER_STATES = ("loading", "serving", "draining")
# A gauge per state, 1 for the current one: prometheus_client's Enum would name its
# label after the metric, and a label name may not hold the `:` of batchd's names.
worker_state = Gauge(
    "batchd:worker_state", "What the worker process is doing: 1 for its current state.", ("worker", "state"),
    registry=WORKER_REGISTRY)


class WorkerState:
    """What one worker process is doing (loading, serving, draining), for /metrics and /health."""

    def __init__(self, worker: str):
        self._gauges = {state: worker_state.labels(worker, state) for state in WORKER_STATES}
        self.set("loading")

    def set(self, state: str) -> None:
        self._now = state
        for name, gauge in self._gauges.items():
            gauge.set(1 if name == state else 0)

    def current(self) -> str:
        return self._now


# -- the OpenAI-compatible gateway (`batchd gateway`, served on its own /metrics) ----------
gateway_requests = Counter(
    "batchd:gateway_requests_total", "HTTP calls the gateway answered, by endpoint, model and status code.",
    ("endpoint", "model_name", "status"), registry=GATEWAY_REGISTRY)
gateway_duration = Histogram(
    "batchd:gateway_request_duration_seconds", "From receiving a call to its response (streams: to its start).",
    ("endpoint", "model_name"), buckets=E2E_BUCKETS, registry=GATEWAY_REGISTRY)
gateway_in_flight = Gauge(
    "batchd:gateway_requests_in_flight", "Calls the gateway is answering now.", registry=GATEWAY_REGISTRY)
gateway_disconnects = Counter(
    "batchd:gateway_disconnects_total", "Calls whose caller went away before the end; their requests were cancelled.",
    ("endpoint", "model_name"), registry=GATEWAY_REGISTRY)


def precreate_scheduler_series() -> None:
    """Zero-valued series for every error code, so increase() sees the first event."""
    for code in ERROR_CODES:
        requests_rejected.labels(code)
        dead_letters.labels(code)
    requests_overloaded.labels("")


class WorkerSeries:
    """One worker's labelled series, looked up once.

    `labels()` costs a tuple build, a lock and a dict lookup per call; at one
    call per token it was ~4% of a busy worker's time (py-spy, 2-core machine).
    Creating them here also makes every series exist from the start, so
    increase() sees the first event.
    """

    def __init__(self, worker: str, model: str):
        labels = (worker, model)
        self._labels = labels
        self.requests_running = requests_running.labels(*labels)
        self.requests_waiting = requests_waiting.labels(*labels)
        self.kv_cache_usage = kv_cache_usage.labels(*labels)
        self.pinned_blocks = pinned_blocks.labels(*labels)
        self.step_batch_size = step_batch_size.labels(*labels)
        self.step_duration = engine_step_duration.labels(*labels)
        self.device_wait = engine_device_wait.labels(*labels)
        self.time_to_first_token = time_to_first_token.labels(*labels)
        self.inter_token_latency = inter_token_latency.labels(*labels)
        self.e2e_latency = e2e_latency.labels(*labels)
        self.queue_time = queue_time.labels(*labels)
        self.prefill_time = prefill_time.labels(*labels)
        self.decode_time = decode_time.labels(*labels)
        self.prompt_tokens = prompt_tokens.labels(*labels)
        self.generation_tokens = generation_tokens.labels(*labels)
        # Engine.stats() keys and the counters they feed; the engine keeps running totals.
        self._engine_counters = {"num_preemptions": preemptions.labels(*labels),
                                 "prefix_cache_queries": prefix_cache_queries.labels(*labels),
                                 "prefix_cache_hits": prefix_cache_hits.labels(*labels),
                                 "prompt_tokens_computed": prompt_tokens_computed.labels(*labels)}
        self._engine_totals: dict[str, int] = {}
        self.heartbeats = heartbeats.labels(*labels)
        self.results_fenced = results_fenced.labels(*labels)
        self._finished = {reason: requests_finished.labels(*labels, reason) for reason in FINISH_REASONS}
        self._errors = {code: request_errors.labels(*labels, code) for code in ERROR_CODES}

    def count_engine_stats(self, totals: dict[str, int]) -> None:
        """Advance the engine's counters by what its running totals grew since the last call."""
        for key, counter in self._engine_counters.items():
            total = totals.get(key)
            if total is None:
                continue
            grown = total - self._engine_totals.get(key, 0)
            if grown > 0:
                counter.inc(grown)
            self._engine_totals[key] = total

    def finished(self, finish_reason: str):
        return self._finished.get(finish_reason) or requests_finished.labels(*self._labels, finish_reason)

    def error(self, error_type: str):
        return self._errors.get(error_type) or request_errors.labels(*self._labels, error_type)


def serve(port: int, registry: CollectorRegistry, host: str = "0.0.0.0",
          state: Callable[[], str] = lambda: "serving") -> None:
    """Serve one role's /metrics, and /health, on host:port (port 0 = do not serve).

    /health answers 200 with "serving", else 503 with the state ("loading" while a
    worker loads its model, "draining" while it stops). Serving the same registry
    again is a no-op: a worker starts serving before it loads its model.
    """
    if not port or registry in _serving:
        return
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO", "").rstrip("/") != "/health":
            return metrics_app(environ, start_response)
        now = state()
        start_response("200 OK" if now == "serving" else "503 Service Unavailable",
                       [("Content-Type", "text/plain; charset=utf-8")])
        return [now.encode() + b"\n"]

    server_class = _HTTPServer6 if ":" in host else _HTTPServer
    try:
        server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    except OSError as exc:
        raise cannot_listen(host, port, "/metrics", "--metrics-port", exc) from None
    threading.Thread(target=server.serve_forever, name=f"metrics:{port}", daemon=True).start()
    _serving.add(registry)


_serving: set[CollectorRegistry] = set()


def cannot_listen(host: str, port: int, what: str, option: str, exc: OSError) -> CannotListen:
    return CannotListen(f"cannot listen on {host}:{port} for {what} ({exc.strerror or exc}); another process "
                        f"may hold the port: choose another {option}, or stop that process")


class _HTTPServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # one line per scrape would flood the daemon's log
        pass
