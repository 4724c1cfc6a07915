"""The open set of predictors: what answers at a multi-exit model's exits, known by name everywhere."""
import pytest
import timm
import torch

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.inference import EarlyExitExecutor, Thresholds
from timm_exits.models.predictors import (PREDICTORS, how_to_predict, known_predictor, predictor_choices,
                                          predictor_of, register_predictor)
from timm_exits.models.product_anytime import ProductAnytimeModel


def _msdnet():
    torch.manual_seed(0)
    return timm.create_model("msdnet_cifar_5exit", num_channels=4, growth_rate=2, num_classes=4).eval()


def test_a_registered_predictor_is_known_by_its_name_and_composes():
    plain = _msdnet()
    assert PREDICTORS["product_anytime"] is ProductAnytimeModel
    assert predictor_of(plain) == "exits" and predictor_of(ProductAnytimeModel(plain)) == "product_anytime"
    assert known_predictor("exits") and known_predictor("product_anytime")
    assert known_predictor("product_anytime+product_anytime")  # one around the other, outermost first
    for name in ("caching", "exits+product_anytime", "", None, "product_anytime+"):
        assert not known_predictor(name)
    assert "'product_anytime'" in predictor_choices() and "'exits'" in predictor_choices()
    assert how_to_predict("product_anytime") == \
        "timm_exits.models.product_anytime.ProductAnytimeModel around the network"


def test_the_executor_names_the_class_to_wrap_the_model_in():
    fitted = Thresholds("tiny", 5, "maxprob", [0.5] * 5, predictor="product_anytime")
    with pytest.raises(ValueError, match=r"run timm_exits\.models\.product_anytime\.ProductAnytimeModel around"):
        EarlyExitExecutor(_msdnet(), fitted)


def test_registration_refuses_bad_and_taken_names():
    class NoName(torch.nn.Module):
        pass

    class Taken(torch.nn.Module):
        predictor = "product_anytime"

    for cls, match in ((NoName, "must be a lower-case identifier"), (Taken, "already answered by")):
        with pytest.raises(ValueError, match=match):
            register_predictor(cls)
    assert PREDICTORS["product_anytime"] is ProductAnytimeModel
