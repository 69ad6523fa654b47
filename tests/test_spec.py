"""Service specs: native YAML/JSON, compose files, errors that name the field, round trip."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.spec import Constraint, ServiceSpec, SpecError, parse_spec, specs_from_value

NATIVE = """
name: web
image: nginx:1.25
args: ["-g", "daemon off;"]
env: {MODE: prod, WORKERS: 4, DEBUG: false}
replicas: 3
ports:
  - {name: http, target: 80, protocol: http, service_port: 8080}
  - {name: admin, target: 9000}
resources: {cpu: 500m, memory: 512Mi, disk: 1G, gpu: 1}
constraints: ["label.zone == a", "node.name != h3", "label.disk in (ssd, nvme)"]
spread: label.zone
health: {http: /healthz, port: http, interval: 5s, timeout: 200ms, retries: 2, start_period: 1m}
update: {parallelism: 2, delay: 10s, health_gated: true, rollback: false}
labels: {app: web, example.com/tier: front}
"""

COMPOSE = """
version: "3.8"
services:
  web:
    image: example/web:2
    command: gunicorn app:app --workers 4
    environment:
      - DATABASE_URL=postgres://db/app
      - FROM_HOST
    ports: ["127.0.0.1:8080:80/tcp", "443"]
    depends_on: [db, cache]
    volumes: ["./static:/static"]
    deploy:
      replicas: 3
      resources:
        limits: {cpus: "1.5", memory: 1g}
        reservations: {cpus: "0.5", memory: 256m}
    healthcheck:
      test: ["CMD", "curl", "-f", "http://localhost/health"]
      interval: 30s
      timeout: 5s
      retries: 3
      start_period: 10s
  db:
    image: postgres:16
    environment: {POSTGRES_PASSWORD: secret, POSTGRES_DB: app}
    ports:
      - {target: 5432, published: 15432, protocol: tcp}
    restart: unless-stopped
    healthcheck:
      test: pg_isready -U postgres
      interval: 1m30s
  cache:
    image: redis:7
    ports: [6379]
    healthcheck: {test: [NONE]}
    restart: "no"
networks:
  default: {}
"""


def parse_one(text: str) -> ServiceSpec:
    specs = parse_spec(text)
    assert len(specs) == 1
    return specs[0]


def error_of(text: str | dict | list) -> str:
    if not isinstance(text, str):
        text = json.dumps(text)
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    return str(info.value)


# -- valid specs ---------------------------------------------------------------


def test_native_yaml_every_field() -> None:
    spec = parse_one(NATIVE)
    assert spec.name == "web" and spec.image == "nginx:1.25" and spec.driver == "docker"
    assert spec.args == ("-g", "daemon off;")
    assert spec.env == {"DEBUG": "false", "MODE": "prod", "WORKERS": "4"}
    assert spec.replicas == 3
    assert [p.name for p in spec.ports] == ["http", "admin"]
    assert spec.ports[0].service_port == 8080 and spec.ports[0].protocol == "http"
    assert spec.ports[1].protocol == "tcp" and spec.ports[1].service_port is None
    assert spec.resources.cpu == 0.5
    assert spec.resources.memory == 512 * 2**20
    assert spec.resources.disk == 10**9
    assert spec.resources.gpu == 1
    assert spec.constraints == (
        Constraint("label.zone", "==", "a"),
        Constraint("node.name", "!=", "h3"),
        Constraint("label.disk", "in", ("ssd", "nvme")),
    )
    assert spec.spread == "label.zone"
    assert spec.restart == "always"
    assert spec.health is not None
    assert (spec.health.kind, spec.health.path, spec.health.port) == ("http", "/healthz", "http")
    assert (spec.health.interval, spec.health.timeout) == (5.0, 0.2)
    assert (spec.health.retries, spec.health.start_period) == (2, 60.0)
    assert spec.update.parallelism == 2 and spec.update.delay == 10.0
    assert spec.update.health_gated and not spec.update.rollback
    assert spec.labels == {"app": "web", "example.com/tier": "front"}
    assert spec.kind == "service"


def test_defaults() -> None:
    spec = parse_one("name: api\ncommand: python -m http.server 8000\n")
    assert spec.command == ("python", "-m", "http.server", "8000")
    assert spec.image is None and spec.driver == "process"
    assert spec.replicas == 1 and spec.spread == "node" and spec.restart == "always"
    assert spec.health is None and spec.ports == () and spec.env == {}
    assert spec.resources.cpu is None and spec.resources.gpu == 0
    assert spec.update.parallelism == 1 and spec.update.health_gated


def test_json_and_lists() -> None:
    one = {"name": "a", "image": "busybox", "command": None, "replicas": 0}
    assert parse_spec(json.dumps(one))[0].replicas == 0
    two = [one, {"name": "b", "command": ["sleep", "10"]}]
    specs = parse_spec(json.dumps(two).encode(), filename="x.json")
    assert [s.name for s in specs] == ["a", "b"]
    assert specs[1].command == ("sleep", "10")
    multi = parse_spec("name: a\nimage: x\n---\nname: b\nimage: y\n")
    assert [s.name for s in multi] == ["a", "b"]
    assert specs_from_value(one)[0].name == "a"


def test_job_defaults_and_parallelism() -> None:
    spec = parse_one("name: batch\nimage: x\nkind: job\nparallelism: 4\ncompletions: 20\n")
    assert spec.kind == "job" and spec.restart == "on-failure"
    assert (spec.parallelism, spec.completions) == (4, 20)


def test_health_kinds() -> None:
    tcp = parse_one("name: a\nimage: x\nports: [{name: db, target: 5432}]\nhealth: {tcp: db}\n")
    assert tcp.health is not None and (tcp.health.kind, tcp.health.port) == ("tcp", "db")
    ex = parse_one("name: a\nimage: x\nhealth: {exec: 'test -f /ready', interval: 1s}\n")
    assert ex.health is not None and ex.health.command == ("test", "-f", "/ready")
    http = parse_one("name: a\nimage: x\nports: [{name: w, target: 80}]\nhealth: {http: /}\n")
    assert http.health is not None and http.health.port == "w"


def test_constraint_matches() -> None:
    node = {"node.name": "h1", "label.zone": "a", "label.disk": "ssd"}
    assert Constraint.parse("label.zone == a", "c").matches(node)
    assert Constraint.parse("node.name!=h3", "c").matches(node)
    assert Constraint.parse("label.disk in (nvme, ssd)", "c").matches(node)
    assert not Constraint.parse("label.gpu == yes", "c").matches(node)


# -- compose -------------------------------------------------------------------


def test_compose_three_services() -> None:
    specs = {s.name: s for s in parse_spec(COMPOSE, filename="docker-compose.yml")}
    assert set(specs) == {"web", "db", "cache"}
    web, db, cache = specs["web"], specs["db"], specs["cache"]

    assert web.image == "example/web:2"
    assert web.args == ("gunicorn", "app:app", "--workers", "4")
    assert web.env == {"DATABASE_URL": "postgres://db/app"}
    assert [(p.target, p.service_port) for p in web.ports] == [(80, 8080), (443, None)]
    assert web.replicas == 3
    assert web.resources.cpu == 0.5 and web.resources.memory == 256 * 2**20
    assert web.health is not None and web.health.command == (
        "curl",
        "-f",
        "http://localhost/health",
    )
    assert (web.health.interval, web.health.timeout, web.health.retries) == (30.0, 5.0, 3)
    assert web.health.start_period == 10.0
    joined = "\n".join(web.warnings)
    for ignored in (
        "services.web.depends_on",
        "services.web.volumes",
        "services.web.environment.FROM_HOST",
        "services.web.ports[0]",
        "networks",
    ):
        assert ignored in joined

    assert db.env == {"POSTGRES_DB": "app", "POSTGRES_PASSWORD": "secret"}
    assert db.ports[0].target == 5432 and db.ports[0].service_port == 15432
    assert db.restart == "always"
    assert db.health is not None
    assert db.health.command == ("/bin/sh", "-c", "pg_isready -U postgres")
    assert db.health.interval == 90.0

    assert cache.health is None and cache.restart == "never"
    assert cache.ports[0].target == 6379 and cache.ports[0].name == "p6379"


def test_compose_limits_stand_in_for_reservations() -> None:
    text = (
        "services:\n  a:\n    image: x\n    deploy:\n      resources:\n"
        "        limits: {cpus: '2', memory: 1g}\n"
    )
    spec = parse_one(text)
    assert spec.resources.cpu == 2.0 and spec.resources.memory == 2**30


@pytest.mark.parametrize(
    ("service", "field"),
    [
        ("ports: ['8080:70000']", "services.web.ports[0].target: must be 1..65535, got 70000"),
        ("ports: ['8080-8090:80']", "services.web.ports[0]: cannot parse port"),
        ("ports: ['53:53/udp']", "services.web.ports[0].protocol: only tcp"),
        ("deploy: {replicas: -1}", "services.web.deploy.replicas: must be 0..10000"),
        (
            "deploy: {resources: {limits: {memory: 12XB}}}",
            "services.web.deploy.resources.limits.memory: cannot parse '12XB'",
        ),
        ("healthcheck: {test: [BOGUS, x]}", "services.web.healthcheck.test: must start with"),
        ("environment: {1BAD: x}", "services.web.environment.1BAD: bad variable name"),
        ("restart: sometimes", "services.web.restart: must be one of"),
        (
            "healthcheck: {test: [CMD, x], retries: 0}",
            "services.web.healthcheck.retries: must be 1..100",
        ),
        ("command: [1]", "services.web.command[0]: must be a string"),
    ],
)
def test_compose_errors_name_the_field(service: str, field: str) -> None:
    assert error_of(f"services:\n  web:\n    image: x\n    {service}\n").startswith(field)


def test_compose_needs_image() -> None:
    assert error_of("services:\n  web:\n    build: .\n").startswith("services.web.image:")
    assert error_of("services:\n  Web_1:\n    image: x\n").startswith("services.Web_1.name:")


# -- errors name their field ---------------------------------------------------

BASE = {"name": "web", "image": "nginx"}


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"name": "Web"}, "name: must be 1-63"),
        ({"name": "-web"}, "name: must be 1-63"),
        ({"name": "a" * 64}, "name: must be 1-63"),
        ({"name": 5}, "name: must be a string"),
        ({"command": "run"}, "image: give exactly one of image"),
        ({"image": None}, "image: give exactly one of image"),
        ({"image": "a b"}, "image: must not contain spaces"),
        ({"image": None, "command": []}, "command: must not be empty"),
        ({"image": None, "command": "a 'b"}, "command: cannot split command"),
        ({"args": [1]}, "args[0]: must be a string"),
        ({"env": {"1X": "a"}}, "env.1X: bad variable name"),
        ({"env": {"X": [1]}}, "env.X: must be a string"),
        ({"replicas": 10001}, "replicas: must be 0..10000, got 10001"),
        ({"replicas": True}, "replicas: must be an integer"),
        ({"ports": {}}, "ports: must be a list"),
        ({"ports": [{"name": "a"}]}, "ports[0].target: is required"),
        ({"ports": [{"target": 1}]}, "ports[0].name: is required"),
        (
            {"ports": [{"name": "a", "target": 1}, {"name": "b", "target": 70000}]},
            "ports[1].target: must be 1..65535, got 70000",
        ),
        (
            {"ports": [{"name": "a", "target": 1, "protocol": "udp"}]},
            "ports[0].protocol: must be one of tcp, http",
        ),
        (
            {"ports": [{"name": "a", "target": 1}, {"name": "a", "target": 2}]},
            "ports[1].name: duplicate port name",
        ),
        (
            {
                "ports": [
                    {"name": "a", "target": 1, "service_port": 80},
                    {"name": "b", "target": 2, "service_port": 80},
                ]
            },
            "ports[1].service_port: duplicate service_port 80",
        ),
        (
            {"ports": [{"name": "a", "target": 1, "service_port": 0}]},
            "ports[0].service_port: must be 1..65535",
        ),
        ({"ports": [{"name": "a", "target": 1, "extra": 1}]}, "ports[0].extra: unknown field"),
        (
            {"resources": {"memory": "12XB"}},
            "resources.memory: cannot parse '12XB' (use e.g. 512Mi or 1G)",
        ),
        ({"resources": {"disk": -1}}, "resources.disk: must be between 0"),
        ({"resources": {"cpu": 0}}, "resources.cpu: must be more than 0"),
        ({"resources": {"cpu": "lots"}}, "resources.cpu: cannot parse 'lots'"),
        ({"resources": {"gpu": -1}}, "resources.gpu: must be 0..1024"),
        ({"resources": {"ram": 1}}, "resources.ram: unknown field"),
        ({"constraints": ["zone = a"]}, "constraints[0]: cannot parse constraint"),
        ({"constraints": ["label.a == b", "host == a"]}, "constraints[1]: unknown attribute"),
        ({"constraints": ["label.disk in ssd"]}, "constraints[0]: 'in' needs a list"),
        ({"spread": "rack"}, "spread: must be 'node' or 'label.<key>'"),
        ({"restart": "sometimes"}, "restart: must be one of always, on-failure, never"),
        ({"health": {}}, "health: needs exactly one of http, tcp or exec, got none"),
        ({"health": {"http": "/", "tcp": "a"}}, "health: needs exactly one of"),
        ({"health": {"http": "healthz"}}, "health.http: must be a path starting with '/'"),
        ({"health": {"http": "/"}}, "health.port: the service declares no ports"),
        ({"health": {"tcp": "web"}}, "health.tcp: no port named 'web'"),
        (
            {"health": {"exec": ["true"], "interval": "5 parsecs"}},
            "health.interval: cannot parse duration",
        ),
        ({"health": {"exec": ["true"], "interval": "10ms"}}, "health.interval: must be between"),
        (
            {"health": {"exec": ["true"], "interval": "1s", "timeout": "5s"}},
            "health.timeout: must not exceed interval",
        ),
        ({"health": {"exec": ["true"], "retries": 0}}, "health.retries: must be 1..100"),
        ({"health": {"exec": ["true"], "start_period": "2h"}}, "health.start_period: must be"),
        ({"update": {"parallelism": 0}}, "update.parallelism: must be 1..10000"),
        ({"update": {"delay": "soon"}}, "update.delay: cannot parse duration"),
        ({"update": {"health_gated": "yes"}}, "update.health_gated: must be true or false"),
        ({"kind": "cron"}, "kind: must be one of service, job"),
        ({"parallelism": 3}, "parallelism: only jobs take"),
        ({"kind": "job", "completions": 0}, "completions: must be 1..1000000"),
        ({"labels": {"bad key!": "x"}}, "labels.bad key!: bad label key"),
        ({"labels": {"app": "-x"}}, "labels.app: bad label value"),
        ({"labels": {"UPPER.example/app": "x"}}, "labels.UPPER.example/app: bad label key prefix"),
        ({"v": 2}, "v: unsupported spec version 2"),
        ({"replica": 3}, "replica: unknown field"),
    ],
)
def test_errors_name_the_field(patch: dict, expected: str) -> None:
    message = error_of({**BASE, **patch})
    assert message.startswith(expected), message


def test_errors_in_a_list_name_the_item() -> None:
    assert error_of([BASE, {**BASE, "name": "b", "replicas": -1}]).startswith("[1].replicas:")
    assert error_of([BASE, BASE]).startswith("name: duplicate service name 'web'")


def test_syntax_errors_give_line_and_column() -> None:
    message = error_of("name: web\nimage: [nginx\nreplicas: 2\n")
    assert "invalid YAML at line" in message and "column" in message
    with pytest.raises(SpecError, match=r"spec.json: invalid JSON at line 1, column \d+"):
        parse_spec('{"name": ', filename="spec.json")
    with pytest.raises(SpecError, match="not UTF-8"):
        parse_spec(b"\xff\xfe\x00name")
    assert error_of("") == "empty document"
    assert error_of("just a string").startswith("must be a spec mapping")


# -- stored form ---------------------------------------------------------------


@pytest.mark.parametrize("text", [NATIVE, COMPOSE, "name: j\ncommand: [a]\nkind: job\n"])
def test_round_trip(text: str) -> None:
    for spec in parse_spec(text):
        stored = spec.to_dict()
        assert stored["v"] == 1
        wire = json.dumps(stored, sort_keys=True)
        again = ServiceSpec.from_dict(json.loads(wire))
        assert again == spec
        assert json.dumps(again.to_dict(), sort_keys=True) == wire


# -- anything else is a SpecError ----------------------------------------------

_KEYS = st.sampled_from(
    [
        "name",
        "image",
        "command",
        "args",
        "env",
        "replicas",
        "ports",
        "resources",
        "constraints",
        "spread",
        "restart",
        "health",
        "update",
        "kind",
        "parallelism",
        "completions",
        "labels",
        "v",
        "target",
        "protocol",
        "service_port",
        "cpu",
        "memory",
        "disk",
        "gpu",
        "http",
        "tcp",
        "exec",
        "port",
        "interval",
        "timeout",
        "retries",
        "start_period",
        "delay",
        "health_gated",
        "rollback",
        "services",
        "environment",
        "deploy",
        "healthcheck",
        "test",
        "limits",
        "reservations",
        "cpus",
        "devices",
        "capabilities",
        "count",
        "published",
        "restart_policy",
        "condition",
    ]
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.sampled_from(
        [
            "web",
            "nginx",
            "500m",
            "1G",
            "5s",
            "/x",
            "tcp",
            "http",
            "job",
            "CMD",
            "8080:80",
            "label.zone == a",
            "a=b",
        ]
    )
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(_KEYS | st.text(max_size=5), inner, max_size=6)
    ),
    max_leaves=30,
)


def _only_spec_errors(value: object) -> None:
    try:
        specs_from_value(value)
    except SpecError as exc:
        assert str(exc)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(_VALUES)
def test_random_values_raise_only_spec_error(value: object) -> None:
    _only_spec_errors(value)
    _only_spec_errors({**BASE, "x": 1} if not isinstance(value, dict) else {**BASE, **value})
    _only_spec_errors({"services": {"web": value}})


@settings(max_examples=300)
@given(st.dictionaries(_KEYS, _VALUES, max_size=8))
def test_random_specs_raise_only_spec_error(value: dict) -> None:
    _only_spec_errors({**BASE, **value})
    _only_spec_errors({"services": {"web": {"image": "x", **value}}})


@settings(max_examples=300)
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_random_text_raises_only_spec_error(data: str | bytes) -> None:
    with contextlib.suppress(SpecError):
        parse_spec(data)


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "a", "image": "x", "replicas": 1%s}' % ("0" * 5000),
        "name: a\nimage: x\nreplicas: 1%s\n" % ("0" * 5000),
        '{"name": "a", "image": "x", "resources": {"cpu": 1%s}}' % ("0" * 400),
        "name: a\nimage: x\nresources: {memory: 1%s}\n" % ("0" * 400),
        "name: a\nimage: x\nhealth: {exec: [x], interval: 1%s}\n" % ("0" * 400),
        "x: !!timestamp 2020-99-99",
        "x: !!float zz",
        '!!int "0x"',
        "a: !!python/object:os.system x",
    ],
)
def test_hostile_scalars_are_spec_errors(text: str) -> None:
    with pytest.raises(SpecError):
        parse_spec(text)


_NAMES = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)
_VALID = st.fixed_dictionaries(
    {"name": _NAMES, "image": st.sampled_from(["nginx", "redis:7", "a/b:1"])},
    optional={
        "args": st.lists(st.text(max_size=5), max_size=3),
        "env": st.dictionaries(
            st.from_regex(r"[A-Z_][A-Z0-9_]{0,5}", fullmatch=True), st.text(max_size=5), max_size=3
        ),
        "replicas": st.integers(0, 10000),
        "ports": st.lists(st.integers(1, 65535), max_size=3, unique=True).map(
            lambda ts: [{"name": f"p{i}", "target": t, "service_port": t} for i, t in enumerate(ts)]
        ),
        "resources": st.fixed_dictionaries(
            {},
            optional={
                "cpu": st.sampled_from([0.25, "500m", 2, "1.5"]),
                "memory": st.sampled_from(["512Mi", "1G", 4096, "1.5Gi"]),
                "gpu": st.integers(0, 8),
            },
        ),
        "constraints": st.lists(
            st.sampled_from(["label.zone == a", "node.name != h3", "label.disk in (ssd, nvme)"]),
            max_size=3,
        ),
        "spread": st.sampled_from(["node", "label.zone"]),
        "restart": st.sampled_from(["always", "on-failure", "never"]),
        "health": st.sampled_from(
            [{"exec": ["true"], "interval": "2s", "timeout": "500ms"}, {"exec": "test -f /x"}]
        ),
        "update": st.fixed_dictionaries(
            {}, optional={"parallelism": st.integers(1, 50), "delay": st.sampled_from(["1s", 3])}
        ),
        "labels": st.dictionaries(
            st.sampled_from(["app", "tier", "x.io/team"]),
            st.from_regex(r"[a-z0-9]{0,6}", fullmatch=True),
            max_size=3,
        ),
    },
)


@settings(max_examples=200)
@given(_VALID)
def test_random_valid_specs_round_trip(data: dict) -> None:
    spec = ServiceSpec.from_dict(data)
    wire = json.dumps(spec.to_dict(), sort_keys=True)
    again = ServiceSpec.from_dict(json.loads(wire))
    assert again == spec
    assert json.dumps(again.to_dict(), sort_keys=True) == wire
