"""What an operator meets, with real processes and a real redis-server: free slots shown as
free slots, one clear line for a bad Redis URL in every command, sizes refused, `up` failing
when a daemon dies, `bench` finishing its outputs on Ctrl-C, /metrics on the chosen address."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from batchd import Client
from batchd.cli import build_parser
from batchd.embedded import free_port

UNREACHABLE = "redis://127.0.0.1:1/0"


def batchd_process(*args: str, **options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "batchd.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **options)


def batchd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchd.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def scrape(port: int, host: str = "127.0.0.1") -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def status_json(url: str) -> dict:
    return json.loads(batchd("status", "--redis", url, "--json").stdout)


def wait_until(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


# -- free slots ---------------------------------------------------------------------------
def test_free_slots_never_count_what_a_worker_prefetches(daemons):
    # The numbers: 1,559 "free" of 1,040 slots, "slots used -520/1040" when idle. A
    # worker takes up to half its slots more into its own queue; those are not free slots.
    port = free_port()
    daemons.scheduler("--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    daemons.echo_worker("--slots", "8", "--token-delay-ms", "40", "--worker-id", "slots-w1")
    daemons.wait_for_workers(1)

    idle = wait_until(lambda: (s := status_json(daemons.url))["workers"] and s, what="a heartbeat")
    assert (idle["free_slots"], idle["total_slots"]) == (8, 8)
    assert idle["workers"][0]["free_slots"] == 8 and idle["workers"][0]["can_take"] == 12
    assert "slots used 0/8" in batchd("status", "--redis", daemons.url).stdout
    metrics = wait_until(lambda: (m := scrape(port)).get(("batchd:total_slots", ())) == 8 and m,
                         what="the scheduler's gauges")
    assert metrics[("batchd:free_slots", ())] == 8

    with Client(daemons.url) as client:
        handles = [client.submit("x" * 150, max_new_tokens=150) for _ in range(12)]
        # 8 running, 4 in the worker's own queue: every slot taken, none free, none "negative".
        full = wait_until(lambda: (s := status_json(daemons.url))["workers"][0]["running"] == 8 and s,
                          what="8 running requests")
        assert (full["free_slots"], full["total_slots"]) == (0, 8)
        assert full["workers"][0]["waiting"] == 4 and full["workers"][0]["can_take"] == 0
        assert "slots used 8/8" in batchd("status", "--redis", daemons.url).stdout
        wait_until(lambda: scrape(port)[("batchd:free_slots", ())] == 0, what="free_slots 0 on /metrics")
        for handle in handles:
            handle.cancel()


def test_metrics_listen_on_the_address_given(daemons):
    # 127.0.0.2 is loopback too: a server bound to every interface answers there, one bound
    # to 127.0.0.1 does not.
    local, everywhere = free_port(), free_port()
    daemons.scheduler("--metrics-port", str(local), "--metrics-host", "127.0.0.1")
    daemons.scheduler("--metrics-port", str(everywhere))
    wait_until(lambda: _answers("127.0.0.1", local) and _answers("127.0.0.2", everywhere), what="/metrics")
    assert not _answers("127.0.0.2", local)


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# -- a bad Redis URL -------------------------------------------------------------------------
BAD_URL_COMMANDS = {
    "scheduler": ["scheduler"],
    # The default model would take a minute to load and convert: the URL is checked first.
    "worker": ["worker"],
    "submit": ["submit", "hello"],
    "status": ["status"],
    "bench": ["bench", "--requests", "1"],
    "up": ["up", "--engine", "echo"],
    "demo": ["demo", "--engine", "echo"],
}


def test_a_bad_redis_url_is_one_clear_line_in_every_command(redis_server):
    runs = {name: batchd_process(*argv, "--redis", UNREACHABLE) for name, argv in BAD_URL_COMMANDS.items()}
    runs["scheduler, not a URL"] = batchd_process("scheduler", "--redis", "http://redis:6379")
    # A real server, the wrong password (none is set, so any password is refused).
    wrong = redis_server.url.replace("redis://", "redis://batchd:wrong@")
    runs["submit, wrong password"] = batchd_process("submit", "hello", "--redis", wrong)
    outputs = {}
    for name, process in runs.items():
        started = time.monotonic()
        stdout, stderr = process.communicate(timeout=60)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert process.returncode == 2, (name, stdout, stderr)
        assert len(lines) == 1 and "Traceback" not in stderr, (name, stderr)
        assert "Redis" in lines[0] and lines[0].startswith(f"batchd {name.split(',')[0]}:"), (name, lines)
        assert time.monotonic() - started < 30, name
        outputs[name] = lines[0]
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in outputs["worker"]
    assert "'http://redis:6379' is not a Redis URL" in outputs["scheduler, not a URL"]
    # The password never appears, only the redacted URL.
    assert "refused the credentials" in outputs["submit, wrong password"] and "wrong" not in outputs["submit, wrong password"]


def test_a_worker_checks_redis_before_loading_its_model():
    started = time.monotonic()
    result = batchd("worker", "--redis", UNREACHABLE, "--model", "smollm2-135m", "--device", "cpu")
    assert result.returncode == 2 and "cannot reach Redis at redis://127.0.0.1:1/0" in result.stderr
    # No model was loaded: that alone takes longer than the whole run here.
    assert "loading" not in result.stderr and time.monotonic() - started < 20


# -- sizes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["worker", "--slots", "0"], ["up", "--slots", "-4"], ["demo", "--slots", "0"],
    ["scheduler", "--max-batch", "0"], ["scheduler", "--max-attempts", "0"], ["scheduler", "--max-queue", "-1"],
    ["scheduler", "--max-wait-ms", "nan"], ["worker", "--lease-ms", "0"], ["worker", "--heartbeat-interval", "0"],
    ["worker", "--max-context", "0"], ["worker", "--max-prefill-tokens", "0"], ["worker", "--burst-prefill-tokens", "0"], ["worker", "--metrics-port", "70000"],
    ["bench", "--concurrency", "0"], ["bench", "--requests", "0"], ["bench", "--rate", "0"],
    ["bench", "--producers", "0"], ["submit", "x", "--max-new-tokens", "0"], ["status", "--interval", "0"],
], ids=" ".join)
def test_an_invalid_size_is_refused_not_replaced_by_a_default(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert f"argument {argv[-2]}" in capsys.readouterr().err


def test_bench_with_no_concurrency_is_refused_at_once():
    result = batchd("bench", "--redis", UNREACHABLE, "--concurrency", "0", timeout=20)
    assert result.returncode == 2 and "--concurrency: '0': must be at least 1" in result.stderr


# -- batchd up ----------------------------------------------------------------------------------
def test_up_fails_when_one_of_its_daemons_dies(redis_server):
    result = batchd("up", "--redis", redis_server.url, "--engine", "hf", "--model", "/no/such/model", timeout=120)
    assert result.returncode == 1, result.stderr
    assert "`batchd worker` exited with code 2" in result.stderr


# -- batchd bench on Ctrl-C --------------------------------------------------------------------------
def test_bench_writes_its_summary_json_and_plot_when_stopped(daemons, tmp_path):
    try:
        import matplotlib  # noqa: F401  (the `bench` extra; without it bench draws no plot)
        plot = True
    except ImportError:
        plot = False
    daemons.scheduler()
    daemons.echo_worker("--token-delay-ms", "20")
    daemons.wait_for_workers(1)
    report, picture = tmp_path / "bench.json", tmp_path / "bench.png"
    # Its own session, like a terminal's foreground group: Ctrl-C reaches every producer too.
    bench = batchd_process("bench", "--redis", daemons.url, "--requests", "5000", "--concurrency", "4",
                           "--producers", "2", "--output-len", "10", "--prompt-len", "10", "--no-progress",
                           "--json", str(report), *(["--plot", str(picture)] if plot else []),
                           start_new_session=True)
    with Client(daemons.url):
        wait_until(lambda: status_json(daemons.url)["requests_dispatched"] >= 20, what="bench traffic")
    os.killpg(bench.pid, signal.SIGINT)
    stdout, stderr = bench.communicate(timeout=60)
    assert bench.returncode == 130, stderr
    assert "stopped by the user" in stdout and "Traceback" not in stderr
    summary = json.loads(report.read_text())
    assert summary["interrupted"] is True
    assert 0 < summary["completed"] < 5000 and summary["latency_s"]["e2e"]["p50"] > 0
    assert picture.stat().st_size > 0 if plot else not picture.exists()


# -- KEDA's own ACL user ---------------------------------------------------------------------------
def acl_line(user: str) -> str:
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    (line,) = [line for line in text.splitlines() if line.startswith(f"ACL SETUSER {user} ")]
    return line


def test_kedas_user_reads_the_queue_and_nothing_else(redis_server, redis_client):
    import redis

    from batchd.client.keys import SCHEDULER_GROUP, Keys

    keys = Keys()
    redis_client.xgroup_create(keys.requests, SCHEDULER_GROUP, id="0", mkstream=True)
    redis_client.xadd(keys.requests, {"id": "r1", "data": b"x"})
    redis_client.execute_command(*acl_line("batchd-keda").split())
    keda = redis.Redis.from_url(redis_server.url.replace("redis://", "redis://batchd-keda:keda-password@"))
    try:
        # What the redis-streams scaler asks: lagCount, pendingEntriesCount, streamLength.
        (group,) = keda.xinfo_groups(keys.requests)
        assert group["lag"] == 1
        assert keda.xpending(keys.requests, SCHEDULER_GROUP)["pending"] == 0
        assert keda.xlen(keys.requests) == 1
        for refused in (lambda: keda.xadd(keys.requests, {"id": "forged"}),
                        lambda: keda.xreadgroup(SCHEDULER_GROUP, "keda", {keys.requests: ">"}),
                        lambda: keda.get(keys.result("r1")),
                        lambda: keda.xlen(keys.jobs("w1"))):
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()
    finally:
        keda.close()


# -- conversion progress ------------------------------------------------------------------------------
def test_a_long_step_reports_while_it_runs(caplog):
    # The conversion took 94 s under a "~20 s" line and a 2 s progress bar: each
    # step now says when it starts and ends, and how long it has run while it runs.
    from batchd.workers.hf.models import Steps

    steps = Steps("converting tiny", 2, every_s=0.05)
    with caplog.at_level("INFO", logger="batchd.models"):
        with steps.step("rebuilding the tokenizer"):
            time.sleep(0.3)
        with steps.step("writing the checkpoint"):
            pass
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "converting tiny: step 1/2, rebuilding the tokenizer..."
    reminders = [line for line in lines if line.startswith("converting tiny: step 1/2") and "so far" in line]
    assert len(reminders) >= 3
    assert lines.index(reminders[-1]) < lines.index(next(l for l in lines if "step 1/2" in l and "done in" in l))
    assert lines[-1].startswith("converting tiny: step 2/2, writing the checkpoint: done in")


# -- a taken port ----------------------------------------------------------------------------
def test_a_taken_port_is_one_clear_line_in_every_daemon(redis_server):
    """Each listener (a scheduler's and a worker's /metrics, the gateway) on a port another
    process holds: the command exits 2 with one line naming the address and the option."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = str(holder.getsockname()[1])
        runs = {
            "scheduler": batchd_process("--log-level", "WARNING", "scheduler", "--redis", redis_server.url,
                                        "--metrics-host", "127.0.0.1", "--metrics-port", port),
            "worker": batchd_process("--log-level", "WARNING", "worker", "--engine", "echo", "--redis",
                                     redis_server.url, "--metrics-host", "127.0.0.1", "--metrics-port", port),
            "gateway": batchd_process("--log-level", "WARNING", "gateway", "--redis", redis_server.url,
                                      "--port", port),
        }
        for name, process in runs.items():
            _stdout, stderr = process.communicate(timeout=60)
            lines = [line for line in stderr.splitlines() if line.strip()]
            assert process.returncode == 2 and len(lines) == 1, (name, stderr)
            assert lines[0].startswith(f"batchd {name}: cannot listen on 127.0.0.1:{port}"), (name, lines)
            option = "--port" if name == "gateway" else "--metrics-port"
            assert f"choose another {option}" in lines[0], lines


# -- a worker still loading its model ----------------------------------------------------------
def test_health_reports_a_worker_loading_its_model_as_loading(redis_server):
    """A worker serves /health from process start ("loading", 503, until its model is loaded;
    tests/engine/test_worker_metrics.py runs a real one). Here that endpoint is stood in for by
    the same metrics server, so the probe's reading of it takes no model load."""
    from batchd.daemon import metrics
    from prometheus_client import CollectorRegistry

    port = free_port()
    metrics.serve(port, CollectorRegistry(), "127.0.0.1", state=lambda: "loading")
    loading = batchd("health", "--redis", redis_server.url, "--worker-id", "gpu-7", "--metrics-port", str(port))
    assert loading.returncode == 1
    assert loading.stdout.strip() == "loading: worker gpu-7 has no heartbeat yet; its /health says loading"
    down = batchd("health", "--redis", redis_server.url, "--worker-id", "gpu-7", "--metrics-port", str(free_port()))
    assert down.returncode == 1 and down.stdout.startswith("unhealthy: worker gpu-7 has no live heartbeat")
