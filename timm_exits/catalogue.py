"""The model catalogue: one YAML file per model family in the top-level ``registry/`` folder, shipped
with the package as the data package ``timm_exits.registry``.

Per variant: a description (the entrypoint's docstring), where it comes from, and its expected
per-exit cost (``expected``: cumulative parameters and MACs in the conventions of
:mod:`timm_exits.profile`). The variants themselves are declared in the model files, the timm way;
the tests compare every registered model with its catalogue entry, and the README's model tables
are made from it (``timm-exits models --markdown``).
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any, Dict, List

import yaml

__all__ = ["load_catalogue", "families"]

_DATA = "timm_exits.registry"  # registry/, mapped to this package name in pyproject.toml


def families() -> List[str]:
    """Names of the catalogued model families."""
    return sorted(f.name[:-5] for f in resources.files(_DATA).iterdir() if f.name.endswith(".yaml"))


@lru_cache(maxsize=None)
def load_catalogue(family: str) -> Dict[str, Any]:
    """The parsed catalogue of one family (e.g. ``"msdnet"``)."""
    path = resources.files(_DATA) / f"{family}.yaml"
    if not path.is_file():
        raise ValueError(f"no catalogue for model family {family!r}; known: {', '.join(families())}")
    return yaml.safe_load(path.read_text())
