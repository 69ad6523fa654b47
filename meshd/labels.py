"""Label rules, shared by node labels (agent config) and service specs.

Kubernetes' rules, so labels move between tools unchanged: a key is an
optional DNS-subdomain prefix and a slash, then a name of up to 63 letters,
digits, '-', '_' or '.', starting and ending alphanumeric; a value is empty
or such a name.
"""

from __future__ import annotations

import re

_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def key_problem(key: str) -> str | None:
    """None for a valid key, else which part is wrong: "prefix" or "name"."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return "prefix"
    if not _NAME.fullmatch(name):
        return "name"
    return None


def valid_value(value: str) -> bool:
    return not value or _NAME.fullmatch(value) is not None
