"""Agent settings: layers and their precedence, defaults, and one-line errors."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gossip import Keyring
from meshd.config import (
    DEFAULT_API_PORT,
    DEFAULT_GOSSIP_PORT,
    AgentConfig,
    ConfigError,
    add_agent_arguments,
    config_from_args,
    default_node_name,
    detect_default_bind,
    load_config,
    parse_host_port,
)

LAN = "192.0.2.10"  # TEST-NET-1: what the injected detector "finds"


def load(
    argv: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    detected: str | None = LAN,
    hostname: str = "host-a",
    euid: int = 1000,
) -> AgentConfig:
    return load_config(
        list(argv),
        {"HOME": "/home/u"} if env is None else env,
        default_bind_detector=lambda: detected,
        hostname=lambda: hostname,
        euid=lambda: euid,
    )


def error(argv: Sequence[str] = (), env: Mapping[str, str] | None = None, **kw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(argv, env, **kw)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


@pytest.fixture
def toml(tmp_path: Path):
    def write(text: str, name: str = "meshd.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    path.write_text(Keyring.encode_key(Keyring.generate()) + "\n")
    return path


# ----- defaults ----------------------------------------------------------------------


def test_defaults_with_a_default_route() -> None:
    c = load()
    assert c.node == "host-a"
    assert c.bind == (LAN, DEFAULT_GOSSIP_PORT)
    assert c.advertise is None
    assert c.api == ("127.0.0.1", DEFAULT_API_PORT)
    assert c.data_dir == Path("/home/u/.local/share/meshd")
    assert c.key_file == c.data_dir / "cluster.key"
    assert c.join == ()
    assert c.cluster == "meshd"
    assert c.mdns is True
    assert c.mdns_interface == LAN
    assert c.labels == {}
    assert (c.log_format, c.log_level, c.profile) == ("text", "info", "lan")
    assert c.api_token is None
    assert c.disks == ()
    assert c.config_file is None


def test_without_a_default_route_the_agent_stays_on_loopback() -> None:
    c = load(detected=None)
    assert c.bind == ("127.0.0.1", DEFAULT_GOSSIP_PORT)
    assert c.mdns_interface == "127.0.0.1"


def test_a_failing_or_odd_detector_falls_back_to_loopback() -> None:
    def broken() -> str:
        raise RuntimeError("no")

    c = load_config([], {}, default_bind_detector=broken, hostname=lambda: "h", euid=lambda: 0)
    assert c.bind[0] == "127.0.0.1"
    assert load(detected="not-an-ip").bind[0] == "127.0.0.1"
    assert load(detected="::1").bind[0] == "127.0.0.1"  # the detector's contract is IPv4


def test_the_detector_is_not_asked_when_the_bind_address_is_given() -> None:
    def never() -> str:
        raise AssertionError("detector called")

    c = load_config(["--bind", "127.0.0.1:0"], {}, default_bind_detector=never)
    assert c.bind == ("127.0.0.1", 0)


def test_bind_with_only_a_port_keeps_the_default_address() -> None:
    assert load(["--bind", ":8000"]).bind == (LAN, 8000)
    assert load(["--bind", ":8000"], detected=None).bind == ("127.0.0.1", 8000)


def test_data_dir_defaults() -> None:
    assert load(euid=0).data_dir == Path("/var/lib/meshd")
    assert load(env={"HOME": "/h"}).data_dir == Path("/h/.local/share/meshd")
    xdg = {"HOME": "/h", "XDG_DATA_HOME": "/xdg"}
    assert load(env=xdg).data_dir == Path("/xdg/meshd")
    assert load(env={"HOME": "/h", "XDG_DATA_HOME": "rel"}).data_dir.name == "meshd"


def test_node_name_defaults_to_a_usable_form_of_the_hostname() -> None:
    assert load(hostname="web-1.example.com").node == "web-1.example.com"
    long = "a" * 40 + "." + "b" * 40
    assert load(hostname=long).node == "a" * 40
    assert default_node_name("bad host!") == "bad-host-"
    assert "give --node" in error(hostname="")


def test_wildcard_bind_advertises_the_default_route_address() -> None:
    c = load(["--bind", "0.0.0.0:7000"])
    assert c.bind == ("0.0.0.0", 7000)
    assert c.advertise == (LAN, 7000)
    assert c.mdns_interface == LAN
    assert load(["--bind", "0.0.0.0", "--advertise", "198.51.100.1"]).mdns_interface == (
        "198.51.100.1"
    )
    message = error(["--bind", "0.0.0.0"], detected=None)
    assert message.startswith("--bind: 0.0.0.0 listens on every interface")
    assert "--advertise" in message


def test_advertise_port_defaults_to_the_bind_port() -> None:
    assert load(["--bind", "127.0.0.1:7100", "--advertise", "10.1.1.1"]).advertise == (
        "10.1.1.1",
        7100,
    )
    assert load(["--bind", "127.0.0.1:0", "--advertise", "10.1.1.1"]).advertise == ("10.1.1.1", 0)
    assert load(["--advertise", "[2001:db8::1]:9000"]).advertise == ("2001:db8::1", 9000)


def test_agent_config_built_directly_derives_key_file_and_mdns_interface(tmp_path: Path) -> None:
    c = AgentConfig(node="n", data_dir=tmp_path, join=[("a", 1)], labels={"x": "1"})
    assert c.key_file == tmp_path / "cluster.key"
    assert c.bind == ("127.0.0.1", DEFAULT_GOSSIP_PORT)  # direct use stays on loopback
    assert c.mdns_interface == "127.0.0.1"
    assert c.join == (("a", 1),)
    assert AgentConfig(node="n", bind=("0.0.0.0", 1)).mdns_interface is None


# ----- layers --------------------------------------------------------------------------

PRECEDENCE = [
    # setting, flag argv, env var and value, TOML line, expected from each layer
    ("node", ["--node", "f"], ("MESHD_NODE", "e"), 'node = "t"', ("f", "e", "t", "host-a")),
    (
        "bind",
        ["--bind", "127.0.0.2"],
        ("MESHD_BIND", "127.0.0.3:7000"),
        'bind = "127.0.0.4:7001"',
        (("127.0.0.2", 7946), ("127.0.0.3", 7000), ("127.0.0.4", 7001), (LAN, 7946)),
    ),
    (
        "join",
        ["--join", "a", "--join", "b:1"],
        ("MESHD_JOIN", "c, d:2"),
        'join = ["e"]',
        ((("a", 7946), ("b", 1)), (("c", 7946), ("d", 2)), (("e", 7946),), ()),
    ),
    ("mdns", ["--no-mdns"], ("MESHD_MDNS", "yes"), "mdns = false", (False, True, False, True)),
    (
        "log_level",
        ["--log-level", "debug"],
        ("MESHD_LOG_LEVEL", "WARNING"),
        'log_level = "error"',
        ("debug", "warning", "error", "info"),
    ),
    (
        "cluster",
        ["--cluster", "f"],
        ("MESHD_CLUSTER", "e"),
        'cluster = "t"',
        ("f", "e", "t", "meshd"),
    ),
    (
        "profile",
        ["--profile", "wan"],
        ("MESHD_PROFILE", "local"),
        'profile = "wan"',
        ("wan", "local", "wan", "lan"),
    ),
    (
        "api",
        ["--api", "127.0.0.1:1"],
        ("MESHD_API", "[::1]:2"),
        'api = "127.0.0.9"',
        (("127.0.0.1", 1), ("::1", 2), ("127.0.0.9", 7947), ("127.0.0.1", 7947)),
    ),
]


@pytest.mark.parametrize(("name", "flag", "env", "line", "expected"), PRECEDENCE)
def test_flags_beat_environment_beat_file_beat_defaults(
    toml: Any, name: str, flag: list[str], env: tuple[str, str], line: str, expected: tuple
) -> None:
    path = toml(line + "\n")
    with_file = ["--config", str(path)]
    assert getattr(load([*with_file, *flag], {env[0]: env[1]}), name) == expected[0]
    assert getattr(load(with_file, {env[0]: env[1]}), name) == expected[1]
    assert getattr(load(with_file, {}), name) == expected[2]
    assert getattr(load([], {}), name) == expected[3]


def test_config_file_from_the_environment_and_flag_wins(toml: Any) -> None:
    a, b = toml('node = "from-a"\n', "a.toml"), toml('node = "from-b"\n', "b.toml")
    assert load([], {"MESHD_CONFIG": str(a)}).node == "from-a"
    assert load(["--config", str(b)], {"MESHD_CONFIG": str(a)}).node == "from-b"
    assert load(["--config", str(b)]).config_file == b


def test_empty_environment_variables_count_as_unset() -> None:
    c = load([], {"MESHD_NODE": "", "MESHD_JOIN": " ", "MESHD_MDNS": ""})
    assert (c.node, c.join, c.mdns) == ("host-a", (), True)


@pytest.mark.parametrize("text", ["1", "true", "Yes", "ON"])
def test_environment_booleans(text: str) -> None:
    assert load([], {"MESHD_MDNS": text}).mdns is True
    assert load([], {"MESHD_MDNS": {"1": "0", "true": "false"}.get(text, "off")}).mdns is False


def test_labels_merge_across_layers_in_priority_order(toml: Any) -> None:
    path = toml('[labels]\nzone = "file"\nrack = "r1"\nssd = true\nunits = 4\n')
    c = load(
        ["--config", str(path), "--label", "zone=flag", "--label", "gpu=yes"],
        {"MESHD_LABELS": "rack=env,tier=web"},
    )
    assert c.labels == {
        "zone": "flag",
        "gpu": "yes",
        "rack": "env",
        "tier": "web",
        "ssd": "true",
        "units": "4",
    }
    assert list(c.labels) == ["zone", "gpu", "rack", "tier", "ssd", "units"]
    assert load(["--label", "example.com/role=db", "--label", "empty="]).labels == {
        "example.com/role": "db",
        "empty": "",
    }


def test_file_paths_are_relative_to_the_file(toml: Any, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "mnt").mkdir()
    path = toml('data_dir = "state"\ndisks = ["mnt", "mnt"]\n')
    c = load(["--config", str(path)])
    assert c.data_dir == tmp_path / "state"
    assert c.key_file == tmp_path / "state" / "cluster.key"
    assert c.disks == (tmp_path / "mnt",)


def test_flag_paths_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    c = load(["--data-dir", "new/state", "--disk", "d"])
    assert c.data_dir == tmp_path / "new" / "state"
    assert c.disks == (tmp_path / "d",)


def test_a_full_file(toml: Any, tmp_path: Path, key_file: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    path = toml(
        f"""
# a whole configuration
node = "db-1"
bind = "[::1]:7000"
advertise = "2001:db8::5"
api = "0.0.0.0:8080"
api_token_file = "{token}"
data_dir = "{tmp_path}"
join = ["10.0.0.1", "seed.example.com:7001", "[2001:db8::9]:7002", "2001:db8::a"]
cluster = "prod"
key_file = "{key_file}"
mdns = false
mdns_interface = "::1"
log_format = "json"
log_level = "warning"
profile = "wan"
disks = ["{tmp_path}"]

[labels]
zone = "eu-1"
"""
    )
    c = load(["--config", str(path)])
    assert c.node == "db-1"
    assert c.bind == ("::1", 7000)
    assert c.advertise == ("2001:db8::5", 7000)
    assert c.api == ("0.0.0.0", 8080)
    assert c.api_token == "s3cret-token-0123456789"
    assert "s3cret" not in repr(c)
    assert c.join == (
        ("10.0.0.1", 7946),
        ("seed.example.com", 7001),
        ("2001:db8::9", 7002),
        ("2001:db8::a", 7946),
    )
    assert (c.cluster, c.key_file, c.mdns, c.mdns_interface) == ("prod", key_file, False, "::1")
    assert (c.log_format, c.log_level, c.profile) == ("json", "warning", "wan")
    assert c.labels == {"zone": "eu-1"}
    assert c.disks == (tmp_path,)


def test_api_token_sources(tmp_path: Path, toml: Any) -> None:
    token_file = tmp_path / "t"
    token_file.write_text("from-the-file-0123456789\n")
    env = {"MESHD_API_TOKEN": "from-the-env-0123456789"}
    assert load([], env).api_token == "from-the-env-0123456789"
    assert load(["--api-token-file", str(token_file)], env).api_token == "from-the-file-0123456789"
    path = toml('api_token = "from-toml-0123456789"\n')
    assert load(["--config", str(path)]).api_token == "from-toml-0123456789"
    assert load(["--config", str(path)], env).api_token == "from-the-env-0123456789"


def test_existing_default_key_file_is_checked(tmp_path: Path) -> None:
    load(["--data-dir", str(tmp_path)])  # missing: the agent makes it
    (tmp_path / "cluster.key").write_text("not a key")
    message = error(["--data-dir", str(tmp_path)])
    assert message == f"key file {tmp_path / 'cluster.key'}: key is not valid base64"


# ----- errors -----------------------------------------------------------------------------

ERRORS = [
    (["--bind", "300.1.1.1"], {}, "--bind: '300.1.1.1' is not an IP address"),
    (["--bind", "host.example.com"], {}, "--bind: 'host.example.com' is not an IP address"),
    (
        ["--bind", "1.2.3.4:99999"],
        {},
        "--bind: '1.2.3.4:99999': port '99999' is not a number from 0 to 65535",
    ),
    (["--bind", "1.2.3.4:x"], {}, "--bind: '1.2.3.4:x': port 'x' is not a number from 0 to 65535"),
    (["--bind", "[::1"], {}, "--bind: '[::1': missing ']' after the IPv6 address"),
    (["--bind", "[1.2.3.4]:5"], {}, "--bind: '1.2.3.4' is not an IPv6 address"),
    (["--bind", "[::1]x"], {}, "--bind: '[::1]x': expected [IPv6]:PORT"),
    (["--bind", ""], {}, "--bind: empty address"),
    ([], {"MESHD_BIND": "1.2.3"}, "MESHD_BIND: '1.2.3' is not an IP address"),
    (["--advertise", "0.0.0.0"], {}, "--advertise: 0.0.0.0 is not an address peers can reach"),
    (["--advertise", "1.2.3.4:0"], {}, "--advertise: '1.2.3.4:0': port 0 is not allowed here"),
    (["--advertise", ":7000"], {}, "--advertise: ':7000': missing the address before the port"),
    (["--api", "localhost:1"], {}, "--api: 'localhost' is not an IP address"),
    (
        ["--api", "10.0.0.1:7947"],
        {},
        "--api: 10.0.0.1 is reachable from other hosts, so the API needs a token: "
        "set MESHD_API_TOKEN or --api-token-file",
    ),
    (
        [],
        {"MESHD_API_TOKEN": "short"},
        "MESHD_API_TOKEN: the API token must be 16 to 4096 visible ASCII characters, no spaces",
    ),
    (["--join", "300.1.1.1"], {}, "--join: '300.1.1.1' is not an IP address or host name"),
    (["--join", "bad_host:1"], {}, "--join: 'bad_host' is not an IP address or host name"),
    (["--join", "a:0"], {}, "--join: 'a:0': port 0 is not allowed here"),
    ([], {"MESHD_JOIN": "a,-b"}, "MESHD_JOIN: '-b' is not an IP address or host name"),
    (
        ["--node", "a b"],
        {},
        "--node: 'a b' is not a valid node name: use 1 to 63 of A-Z a-z 0-9 . _ -",
    ),
    (
        ["--node", "x" * 64],
        {},
        f"--node: '{'x' * 64}' is not a valid node name: use 1 to 63 of A-Z a-z 0-9 . _ -",
    ),
    (
        ["--cluster", "prod/1"],
        {},
        "--cluster: 'prod/1' is not a valid cluster name: use 1 to 63 of A-Z a-z 0-9 . _ -",
    ),
    (["--label", "x"], {}, "--label: expected KEY=VALUE, got 'x'"),
    (
        ["--label=-x=1"],
        {},
        "--label: label key '-x' is not valid: use up to 63 of A-Z a-z 0-9 - _ . starting and "
        "ending with a letter or digit, with an optional DNS prefix as in 'example.com/zone'",
    ),
    (
        ["--label", f"{'k' * 64}=1"],
        {},
        f"--label: label key '{'k' * 64}' is not valid: use up to 63 of A-Z a-z 0-9 - _ . "
        "starting and ending with a letter or digit, with an optional DNS prefix as in "
        "'example.com/zone'",
    ),
    (
        ["--label", "Bad_Prefix/x=1"],
        {},
        "--label: label key 'Bad_Prefix/x' is not valid: use up to 63 of A-Z a-z 0-9 - _ . "
        "starting and ending with a letter or digit, with an optional DNS prefix as in "
        "'example.com/zone'",
    ),
    (
        ["--label", "zone=a b"],
        {},
        "--label: label 'zone': value 'a b' is not valid: use up to 63 of A-Z a-z 0-9 - _ . "
        "starting and ending with a letter or digit",
    ),
    (
        ["--label", f"zone={'v' * 64}"],
        {},
        f"--label: label 'zone': value '{'v' * 64}' is not valid: use up to 63 of A-Z a-z 0-9 "
        "- _ . starting and ending with a letter or digit",
    ),
    (["--label", "a=1", "--label", "a=2"], {}, "--label: label 'a' given twice"),
    ([], {"MESHD_LABELS": "a=1,b"}, "MESHD_LABELS: expected KEY=VALUE, got 'b'"),
    (
        [arg for i in range(65) for arg in ("--label", f"k{i}=v")],
        {},
        "too many labels: 65 (at most 64)",
    ),
    (["--log-format", "xml"], {}, "--log-format: 'xml' is not one of text, json"),
    (
        [],
        {"MESHD_LOG_LEVEL": "loud"},
        "MESHD_LOG_LEVEL: 'loud' is not one of debug, info, warning, error",
    ),
    (["--profile", "moon"], {}, "--profile: 'moon' is not one of lan, local, wan"),
    ([], {"MESHD_MDNS": "maybe"}, "MESHD_MDNS: expected true or false, got 'maybe'"),
    (["--mdns-interface", "eth0"], {}, "--mdns-interface: 'eth0' is not an IP address"),
    (
        ["--mdns-interface", "::"],
        {},
        "--mdns-interface: :: means every interface: name one address",
    ),
    (["--disk", "/no/such/dir"], {}, "--disk /no/such/dir: no such directory"),
    (["--data-dir", "/etc/hostname"], {}, "--data-dir /etc/hostname: not a directory"),
    (["--key-file", "/no/such.key"], {}, "--key-file /no/such.key: no such file"),
    (["--key-file", "/"], {}, "--key-file /: is a directory, not a file"),
    (["--config", "/no/such.toml"], {}, "config file /no/such.toml: no such file"),
    ([], {"MESHD_CONFIG": "/no/such.toml"}, "config file /no/such.toml: no such file"),
]


@pytest.mark.parametrize(("argv", "env", "expected"), ERRORS)
def test_each_bad_value_is_one_clear_line(
    argv: list[str], env: dict[str, str], expected: str
) -> None:
    assert error(argv, env) == expected


def test_bad_key_file_contents(tmp_path: Path) -> None:
    bad = tmp_path / "k"
    bad.write_text("c2hvcnQ=")
    assert (
        error(["--key-file", str(bad)]) == f"--key-file {bad}: key must decode to 32 bytes, got 5"
    )
    bad.write_bytes(b"\xff\xfe")
    assert error(["--key-file", str(bad)]) == f"--key-file {bad}: not a text file"


def test_unreadable_key_file(key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        key_file.chmod(0)
    else:  # root reads anything: make the read fail as it would for a user

        def denied(self: Path, *args: Any, **kwargs: Any) -> str:
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "read_text", denied)
    assert error(["--key-file", str(key_file)]) == (
        f"--key-file {key_file}: not readable: permission denied"
    )


def test_token_errors_never_show_the_token(tmp_path: Path) -> None:
    secret = "has space in it but long enough"
    message = error([], {"MESHD_API_TOKEN": secret})
    assert secret not in message and "has space" not in message
    token_file = tmp_path / "token"
    token_file.write_text("tiny\n")
    assert error(["--api-token-file", str(token_file)]).startswith(
        f"--api-token-file {token_file}: the API token must be"
    )
    both = {"MESHD_API_TOKEN": "x" * 20, "MESHD_API_TOKEN_FILE": str(token_file)}
    assert error([], both) == (
        "MESHD_API_TOKEN_FILE: give the token or a token file, not both (MESHD_API_TOKEN)"
    )
    assert error(["--api-token-file", "/nope"]) == "--api-token-file /nope: no such file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_data_dir_not_writable(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert error(["--data-dir", str(locked)]) == f"--data-dir {locked}: not writable"


# ----- TOML errors ---------------------------------------------------------------------------

TOML_ERRORS = [
    ('node = "a"\nbind = \n', "line 2, column 8: invalid value"),
    ('node = "a"\nbind = ', "end of file: invalid value"),
    ('node = "a"\nnode = "b"\n', "line 2, column 11: cannot overwrite a value"),
    ('[labels]\na = "1"\n[labels]\n', "line 3, column 8: cannot declare ('labels',) twice"),
    ('node = "a"\n\nfoo = 1\n', "line 3: unknown key 'foo'"),
    ('joins = ["a"]\n', "line 1: unknown key 'joins' (did you mean 'join'?)"),
    ('label = {a = "1"}\n', "line 1: unknown key 'label' (did you mean 'labels'?)"),
    ("[bogus]\nx = 1\n", "line 1: unknown key 'bogus'"),
    ("# c\nmdns = 1\n", "line 2: mdns: must be true or false, got an integer"),
    ("bind = 7946\n", "line 1: bind: must be a string, got an integer"),
    ('join = "a"\n', "line 1: join: must be a list of strings, got a string"),
    ("join = [1]\n", "line 1: join: must be a list of strings, but holds an integer"),
    ('labels = "a=b"\n', 'line 1: labels: must be a table such as [labels] zone = "a", '),
    ("[labels]\nzone = 1.5\n", "line 2: labels.zone: must be a string, got a float"),
    ('[labels]\n"bad key" = "x"\n', "line 2: labels.bad key: label key 'bad key' is not valid"),
    ('labels.zone = "a b"\n', "line 1: labels.zone: label 'zone': value 'a b' is not valid"),
    ('\n\nbind = "1.2.3.4.5"\n', "line 3: bind: '1.2.3.4.5' is not an IP address"),
    ('log_level = "loud"\n', "line 1: log_level: 'loud' is not one of"),
    ('disks = ["/no/such"]\n', "line 1: disks /no/such: no such directory"),
    ('api_token = "x"\n', "line 1: api_token: the API token must be"),
]


@pytest.mark.parametrize(("text", "expected"), TOML_ERRORS)
def test_config_file_errors_name_the_file_and_line(toml: Any, text: str, expected: str) -> None:
    path = toml(text)
    message = error(["--config", str(path)])
    assert message.startswith(f"config file {path}: {expected}"), message


def test_config_file_that_is_not_text(toml: Any, tmp_path: Path) -> None:
    path = tmp_path / "bin.toml"
    path.write_bytes(b'node = "\xff"\n')
    assert error(["--config", str(path)]) == f"config file {path}: not UTF-8 text (byte 8)"
    assert (
        error(["--config", str(tmp_path)]) == f"config file {tmp_path}: is a directory, not a file"
    )


# ----- the command line -------------------------------------------------------------------------


def test_help_lists_every_option_and_its_environment_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        load(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: meshd agent")
    for option in [
        "--config",
        "--node",
        "--bind",
        "--advertise",
        "--api",
        "--api-token-file",
        "--data-dir",
        "--join",
        "--cluster",
        "--key-file",
        "--mdns, --no-mdns",
        "--mdns-interface",
        "--label",
        "--disk",
        "--log-format",
        "--log-level",
        "--profile",
    ]:
        assert option in out
    for var in ["MESHD_BIND", "MESHD_JOIN", "MESHD_LABELS", "MESHD_API_TOKEN", "MESHD_CONFIG"]:
        assert var in out
    assert "highest first" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--bogus"], "meshd: error: unrecognized arguments: --bogus"),
        (["--bind"], "meshd: error: argument --bind: expected one argument"),
        (
            ["--mdns=yes"],
            "meshd: error: argument --mdns/--no-mdns: ignored explicit argument 'yes'",
        ),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        load(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == expected + "\n"


def test_the_cli_can_reuse_the_arguments_in_a_subcommand(tmp_path: Path) -> None:
    top = argparse.ArgumentParser(prog="meshd")
    sub = top.add_subparsers(dest="command")
    add_agent_arguments(sub.add_parser("agent"))
    ns = top.parse_args(["agent", "--node", "x", "--label", "a=1", "--data-dir", str(tmp_path)])
    c = config_from_args(ns, {}, default_bind_detector=lambda: None)
    assert (c.node, c.labels, c.data_dir, c.bind[0]) == ("x", {"a": "1"}, tmp_path, "127.0.0.1")


# ----- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1", ("10.0.0.1", 7946)),
        ("10.0.0.1:80", ("10.0.0.1", 80)),
        ("[::1]:7000", ("::1", 7000)),
        ("[::1]", ("::1", 7946)),
        ("::1", ("::1", 7946)),
        ("2001:DB8::1", ("2001:db8::1", 7946)),
        ("fe80::1%eth0", ("fe80::1%eth0", 7946)),
        (" 10.0.0.1 ", ("10.0.0.1", 7946)),
        ("Seed.Example.com.", ("seed.example.com", 7946)),
        ("node-7:8000", ("node-7", 8000)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, DEFAULT_GOSSIP_PORT, hostnames=True) == expected


@pytest.mark.parametrize("text", ["1.2.3.4:5:6", "a..b", "1.2.3.04", "a:", "a:-1", "::1:x"])
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text, DEFAULT_GOSSIP_PORT, hostnames=True)


# ----- the default bind detector ----------------------------------------------------------------

ROUTES = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
down0\t00000000\t010200C0\t0002\t0\t0\t0\t00000000\t0\t0\t0
"""


def addrs(table: dict[str, list[tuple[int, str]]]) -> dict[str, list[Any]]:
    return {
        name: [SimpleNamespace(family=f, address=a) for f, a in entries]
        for name, entries in table.items()
    }


def test_detector_picks_the_lowest_metric_default_route(tmp_path: Path) -> None:
    routes = tmp_path / "route"
    routes.write_text(ROUTES)
    table = {
        "eth0": [(socket.AF_INET6, "fe80::1"), (socket.AF_INET, "192.0.2.7")],
        "wlan0": [(socket.AF_INET, "192.168.1.5")],
        "down0": [(socket.AF_INET, "203.0.113.1")],
    }
    assert detect_default_bind(routes, lambda: addrs(table)) == "192.0.2.7"


def test_detector_without_a_usable_route(tmp_path: Path) -> None:
    routes = tmp_path / "route"
    routes.write_text(ROUTES.splitlines()[0] + "\n" + ROUTES.splitlines()[3] + "\n")
    assert detect_default_bind(routes, lambda: addrs({})) is None
    routes.write_text(ROUTES)
    assert detect_default_bind(routes, lambda: addrs({"eth0": [(socket.AF_INET6, "::1")]})) is None
    assert detect_default_bind(tmp_path / "missing", lambda: addrs({})) is None
    routes.write_text("garbage\nx y z\n" + "a " * 8 + "\n")
    assert detect_default_bind(routes, lambda: addrs({})) is None


def test_driver_and_docker_url_settings(tmp_path: Path) -> None:
    c = load_config(
        ["--driver", "process", "--docker-url", "unix:///x.sock", "--data-dir", str(tmp_path)], {}
    )
    assert (c.driver, c.docker_url) == ("process", "unix:///x.sock")
    assert load_config(["--data-dir", str(tmp_path)], {"MESHD_DRIVER": "Docker"}).driver == "docker"
    assert load_config(["--data-dir", str(tmp_path)], {}).driver == "auto"
    with pytest.raises(ConfigError, match="--driver: 'podman' is not one of auto, docker, process"):
        load_config(["--driver", "podman", "--data-dir", str(tmp_path)], {})
