"""The ``balance`` field: which load-balancing policy the mesh proxies use."""

from __future__ import annotations

import pytest

from meshd.proxy.balancing import POLICIES
from meshd.scheduler.assignment import spec_version
from meshd.spec import Balance, ServiceSpec, SpecError
from meshd.spec.model import BALANCE_POLICIES

BASE = {"name": "web", "command": ["sleep", "1"]}


def test_spec_policies_match_the_proxy() -> None:
    assert BALANCE_POLICIES == POLICIES


def test_default_is_round_robin() -> None:
    assert ServiceSpec.from_dict(BASE).balance == Balance("round_robin", "client")


@pytest.mark.parametrize("policy", POLICIES)
def test_short_form_and_round_trip(policy: str) -> None:
    spec = ServiceSpec.from_dict({**BASE, "balance": policy})
    assert spec.balance.policy == policy
    assert ServiceSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("hash_on", ["client", "header:X-User", "cookie:session_id"])
def test_hash_keys(hash_on: str) -> None:
    spec = ServiceSpec.from_dict({**BASE, "balance": {"policy": "hash", "hash_on": hash_on}})
    assert spec.balance == Balance("hash", hash_on)
    assert ServiceSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("balance", "field", "words"),
    [
        ("fastest", "balance.policy", "must be one of"),
        ({"policy": "hash", "hash_on": "path"}, "balance.hash_on", "header:<name>"),
        ({"policy": "hash", "hash_on": "header:"}, "balance.hash_on", "header:<name>"),
        ({"policy": "hash", "hash_on": "cookie:a b"}, "balance.hash_on", "cookie:<name>"),
        ({"policy": "round_robin", "hash_on": "header:X"}, "balance.hash_on", "only the hash"),
        ({"policy": "p2c", "weight": 3}, "balance.weight", "unknown field"),
        (7, "balance", "must be a mapping"),
    ],
)
def test_bad_balance_names_the_field(balance: object, field: str, words: str) -> None:
    with pytest.raises(SpecError) as err:
        ServiceSpec.from_dict({**BASE, "balance": balance})
    assert err.value.path == field
    assert words in str(err.value)


def test_changing_the_policy_does_not_roll_replicas() -> None:
    a = ServiceSpec.from_dict(BASE)
    b = ServiceSpec.from_dict({**BASE, "balance": "least_conn"})
    assert spec_version(a) == spec_version(b)
