"""Writing result files whole or not at all."""
from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, obj: Any, **dump_kwargs: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (a temporary file, then a rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, **dump_kwargs)
    os.replace(tmp, path)
