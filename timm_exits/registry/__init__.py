"""The model catalogue: one YAML file per model family, shipped with the package.

Each variant holds its constructor arguments (``args``), its timm pretrained cfg (``cfg``), a
description, and its expected per-exit cost (``expected``: cumulative parameters and MACs in
the conventions of :mod:`timm_exits.profile`). Model files register their timm entrypoints
from it; the tests build every variant and compare it with these numbers.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any, Callable, Dict, List

import yaml

__all__ = ["load_catalogue", "families", "register_entrypoints"]


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


def register_entrypoints(family: str, module: str, create: Callable[..., Any]) -> Dict[str, Callable[..., Any]]:
    """Register a timm entrypoint for every variant of ``family``, as if defined in ``module`` (whose
    ``default_cfgs`` timm reads); ``create(name, variant, pretrained, **kwargs)`` builds the model.
    Returns the entrypoints by name, for the module's namespace."""
    from timm.models import register_model

    def entrypoint(name: str, variant: Dict[str, Any]) -> Callable[..., Any]:
        def create_variant(pretrained: bool = False, **kwargs):
            return create(name, variant, pretrained, **kwargs)

        create_variant.__name__ = create_variant.__qualname__ = name
        create_variant.__module__ = module
        create_variant.__doc__ = variant["description"]
        return register_model(create_variant)

    return {name: entrypoint(name, variant) for name, variant in load_catalogue(family)["variants"].items()}
