"""The model catalogue (top-level registry/, shipped as timm_exits.registry) against the models the
model files register the timm way."""
import inspect
import re
from importlib import resources

import pytest
import timm
import torch

import timm_exits  # noqa: F401
from timm_exits.catalogue import families, load_catalogue
from timm_exits.models import adaptive_depth, dyn_perceiver, exits, msdnet, ranet

MODULES = {"msdnet": msdnet, "exits": exits, "adn": adaptive_depth, "ranet": ranet,
           "dyn_perceiver": dyn_perceiver}
KEYS = {"description", "source", "reference_command", "backbone", "expected", "reference"}


def test_the_catalogue_ships_as_package_data():
    assert families() == sorted(MODULES)
    shipped = {f.name for f in resources.files("timm_exits.registry").iterdir()}
    assert {f"{family}.yaml" for family in MODULES} <= shipped
    with pytest.raises(ValueError, match="no catalogue for model family 'nope'; known: adn, dyn_perceiver, exits, msdnet, ranet"):
        load_catalogue("nope")


@pytest.mark.parametrize("family", sorted(MODULES))
def test_every_registered_model_is_catalogued_and_declared_where_grep_finds_it(family):
    module = MODULES[family]
    catalogue = load_catalogue(family)["variants"]
    assert sorted(catalogue) == sorted(timm.list_models(module=module.__name__.split(".")[-1]))
    source = inspect.getsource(module)
    for name, variant in catalogue.items():
        assert set(variant) <= KEYS, f"{name}: constructor arguments belong in the entrypoint"
        assert re.search(rf"^def {name}\(pretrained: bool = False, \*\*kwargs\)", source, re.M), name
        assert inspect.getdoc(getattr(module, name)) == variant["description"]
        assert name in module.default_cfgs


@pytest.mark.parametrize("family", ["exits", "adn"])
def test_the_catalogued_backbone_is_the_one_the_entrypoint_wraps(family):
    for name, variant in load_catalogue(family)["variants"].items():
        with torch.device("meta"):
            model = timm.create_model(name)
            plain = timm.create_model(variant["backbone"])
        if family == "exits":
            assert model.backbone.state_dict().keys() == plain.state_dict().keys(), name
            assert all(model.backbone.state_dict()[k].shape == t.shape for k, t in plain.state_dict().items())
        else:  # the plain backbone's weights fit the ADN network exactly (norm twins copied)
            model.load_state_dict(adaptive_depth.checkpoint_filter_fn(plain.state_dict(), model))
