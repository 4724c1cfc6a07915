"""timm's feature API (``features_only``, ``forward_intermediates``) for the package's models."""
from typing import Optional, Sequence, Union

__all__ = ["check_feature_indices"]


def check_feature_indices(indices: Optional[Union[int, Sequence[int]]], num_features: int, model: str) -> None:
    """Refuse feature indices that a model cannot give.

    Args:
        indices: indices in [-n, n-1], an int in [1, n] (the last that many), or ``None`` (all).
        num_features: n, the number of feature maps of the model.
        model: what the model is (e.g. ``"MSDNet"``), to name it in the error.

    Raises:
        ValueError: an index, or the count, is out of range, or the sequence is empty.
    """
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
