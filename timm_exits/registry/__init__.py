"""The model catalogue: one YAML file per model family, shipped with the package.

Each variant holds its constructor arguments (``args``), its timm pretrained cfg (``cfg``), a
description, and its expected per-exit cost (``expected``: cumulative parameters and MACs in
the conventions of :mod:`timm_exits.profile`). Model files register their timm entrypoints
from it; the tests build every variant and compare it with these numbers.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any, Dict, List

import yaml

__all__ = ["load_catalogue", "families"]


def families() -> List[str]:
    """Names of the catalogued model families."""
    return sorted(f.name[:-5] for f in resources.files(__name__).iterdir() if f.name.endswith(".yaml"))


@lru_cache(maxsize=None)
def load_catalogue(family: str) -> Dict[str, Any]:
    """The parsed catalogue of one family (e.g. ``"msdnet"``)."""
    path = resources.files(__name__) / f"{family}.yaml"
    if not path.is_file():
        raise ValueError(f"no catalogue for model family {family!r}; known: {', '.join(families())}")
    return yaml.safe_load(path.read_text())
