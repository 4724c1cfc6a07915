"""``held_out_split``: the one held-out split of the engine's runs (test, validation, training) and of
``timm-exits evaluate --val-fraction`` (validation, test), pinned against ``seeded_order``."""
import pytest
from accelerate import Accelerator

from timm_exits.config import load_config
from timm_exits.data import held_out_split, seeded_order, split_dataset
from timm_exits.engine import Splits

from helpers import tiny_data, write_config


@pytest.mark.parametrize("test_split, seed", [(None, 0), (None, 7), ("val", 3)])
def test_the_engine_splits_are_those_of_one_seeded_order(tmp_path, test_split, seed):
    """Pinned: a resumed run and the main job's numbers depend on the same images in each split for
    the same seed and fractions, [test (if held out)] [validation] [training] of one seeded order."""
    config = load_config(str(write_config(tmp_path / "c.py", tiny_data(tmp_path / "data"), extra="tracker = None")),
                         output_dir=str(tmp_path / "out"))
    config["data"].update(test_split=test_split, test_fraction=0.25 if test_split is None else 0.0, split_seed=seed)
    splits = Splits(config, Accelerator(cpu=True))
    order = seeded_order(48, seed)
    n_test = 12 if test_split is None else 0
    if test_split is None:
        assert splits.test.indices == order[:12]
    else:
        assert len(splits.test) == 21  # the val/ folder
    assert splits.val.indices == order[n_test:n_test + 16]  # val_fraction 1/3 of 48
    assert splits.train.indices == order[n_test + 16:]


def test_the_cli_split_is_the_held_out_part_of_one_seeded_order():
    val, test = split_dataset(list(range(30)), 0.5, seed=3)
    assert val.indices == seeded_order(30, 3)[:15] and test.indices == seeded_order(30, 3)[15:]
    val, test = split_dataset(list(range(30)), 0.25, seed=0)  # round(7.5) = 8
    assert val.indices == seeded_order(30, 0)[:8] and test.indices == seeded_order(30, 0)[8:]
    with pytest.raises(ValueError, match="holds out none"):
        split_dataset(list(range(30)), 0.01)


def test_held_out_parts_leave_a_rest():
    parts = held_out_split(10, {"test": 0.2, "validation": 0.3}, seed=1)
    assert parts == {"test": seeded_order(10, 1)[:2], "validation": seeded_order(10, 1)[2:5],
                     "rest": seeded_order(10, 1)[5:]}
    with pytest.raises(ValueError, match=r"10 images cannot give 5 test \(fraction 0.5\) and 5 validation"):
        held_out_split(10, {"test": 0.5, "validation": 0.5})
