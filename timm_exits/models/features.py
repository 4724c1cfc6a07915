"""timm's feature API (``features_only``, ``forward_intermediates``) for the package's models."""
from typing import Optional, Sequence, Union

__all__ = ["check_feature_indices"]


def check_feature_indices(indices: Optional[Union[int, Sequence[int]]], num_features: int, model: str) -> None:
    """Refuse feature indices that ``model`` (a name for the message) with ``num_features`` feature
    maps cannot give: indices in [-n, n-1], an int n in [1, n] (the last n), or None (all)."""
    if indices is None:
        return
    n = num_features
    if isinstance(indices, int):
        bad = not 0 < indices <= n
    else:
        bad = len(indices) == 0 or any(not -n <= int(i) < n for i in indices)
    if bad:
        raise ValueError(f"feature indices {indices!r} out of range: this {model} has {n} feature maps "
                         f"(model.feature_info), so give indices in [{-n}, {n - 1}] or a count in [1, {n}] (the last n)")
