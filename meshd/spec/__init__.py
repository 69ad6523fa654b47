"""Service specs: what users write, checked field by field, and the stored form."""

from .errors import SpecError
from .model import Balance, Constraint, Health, Port, Resources, ServiceSpec, Update
from .parse import parse_spec, specs_from_value

__all__ = [
    "Balance",
    "Constraint",
    "Health",
    "Port",
    "Resources",
    "ServiceSpec",
    "SpecError",
    "Update",
    "parse_spec",
    "specs_from_value",
]
