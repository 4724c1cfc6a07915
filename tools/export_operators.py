"""Make ``timm_exits/inference/export_operators.json``: the aten operators exports of timm-exits' models
are made of, the only ones ``ExportedModel`` runs (others need ``extra_operators``).

It exports (in memory) every registered model (the ``adn`` ones with exits added), MSDNet's fused
form of every registered MSDNet, every exit-history wrapper and the IMTA phase-II model in each of
their variants, and the exit heads the registered models lack; each under ``torch.no_grad()``,
``torch.inference_mode()`` and with gradients on, each in contiguous and channels-last layouts::

    python tools/export_operators.py            # writes the list (about 20 minutes on 2 cores)
    python tools/export_operators.py --check    # compares only; exit status 1 if the list drifted

``tests/test_export.py`` regenerates the list from :data:`REPRESENTATIVE` (small models of every
family, every wrapper; :data:`EVERY_MODE` of them in every grad mode and layout) and asserts that it
gives the shipped list exactly.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import timm
import torch
from timm.utils import reparameterize_model

import timm_exits
from timm_exits.catalogue import families, load_catalogue
from timm_exits.inference.export import OPERATORS, exported_operators
from timm_exits.models.boostnet import BoostedExits
from timm_exits.models.imta import IMTAModel
from timm_exits.models.product_anytime import ProductAnytimeModel
from timm_exits.models.ztw import ZTWModel

LIST = Path(timm_exits.__file__).parent / "inference" / OPERATORS
GRAD_MODES = {"grad": nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
LAYOUTS = (torch.contiguous_format, torch.channels_last)
Case = Callable[[], Tuple[torch.nn.Module, torch.Tensor]]


def registered(name: str, input_size: Optional[Sequence[int]] = None, **kwargs) -> Case:
    """A registered model (``*_adn``: with exits added), by default at its default input size."""
    def build():
        if name.endswith("_adn"):
            model = timm_exits.add_exits(name, num_classes=10, **kwargs)
        else:
            model = timm.create_model(name, num_classes=10, **kwargs)
        return model, torch.randn(2, *(input_size or model.pretrained_cfg["input_size"]))
    return build


def fused(case: Case) -> Case:
    """MSDNet's fused inference form (``timm.utils.reparameterize_model``) of ``case``'s model."""
    def build():
        model, x = case()
        return reparameterize_model(model.eval()), x
    return build


def wrapped(wrapper: Callable[[torch.nn.Module], torch.nn.Module], case: Case) -> Case:
    def build():
        model, x = case()
        return wrapper(model), x
    return build


def _tiny_msdnet(**kwargs) -> Case:
    return registered("msdnet_cifar_5exit", num_channels=4, growth_rate=2, num_blocks=3, **kwargs)


def _tiny_msdnet_imagenet() -> Case:
    return registered("msdnet_imagenet_5exit", num_channels=4, growth_rate=2, num_blocks=2)


def _wrappers(msdnet: Case, resnet: Case) -> Dict[str, Case]:
    """Every exit-history wrapper and the IMTA phase-II model, in each variant that computes
    differently, around a small MSDNet and a ResNet with exits."""
    return {
        "ztw(msdnet)": wrapped(ZTWModel, msdnet),
        "ztw(resnet, plain)": wrapped(lambda m: ZTWModel(m, layer_norm=False, ensembles=False), resnet),
        "boostnet(resnet)": wrapped(BoostedExits, resnet),
        "product_anytime(ztw(msdnet))": wrapped(lambda m: ProductAnytimeModel(ZTWModel(m)), msdnet),
        "product_anytime(resnet, softplus, no fallback)":
            wrapped(lambda m: ProductAnytimeModel(m, softplus=True, fallback=False), resnet),
        "product_anytime(msdnet, ceiling)": wrapped(lambda m: ProductAnytimeModel(m, ceiling=5.0), msdnet),
        "imta(msdnet)": wrapped(IMTAModel, msdnet),
        "imta(resnet, no isc)": wrapped(lambda m: IMTAModel(m, isc=None), resnet),
    }


def _heads(backbone: str, **kwargs) -> Dict[str, Case]:
    """The exit heads the registered models do not use (``conv``, and SDN's placement and heads)."""
    def head(**options) -> Case:
        def build():
            model = timm_exits.add_exits(backbone, num_classes=10, **options, **kwargs)
            return model, torch.randn(2, *model.pretrained_cfg["input_size"])
        return build
    return {f"{backbone} conv heads": head(head="conv"), f"{backbone} sdn heads": head(exits="sdn", head="sdn")}


def all_cases() -> Dict[str, Case]:
    """Every registered model, every fused MSDNet, the wrappers and the heads."""
    cases = {name: registered(name) for family in families() for name in load_catalogue(family)["variants"]}
    cases.update({f"fused {name}": fused(cases[name]) for name in list(cases) if name.startswith("msdnet")})
    cases.update(_wrappers(_tiny_msdnet(), registered("resnet18_exits")))
    cases.update(_heads("resnet18"))
    return cases


# small models of every family (every code path that makes operators) and every wrapper: the test's
# regeneration; a family's larger variants are made of the same code
_SMALL_VIT = dict(img_size=32, input_size=(3, 32, 32), depth=4, exits=(0, 1, 2))
REPRESENTATIVE: Dict[str, Case] = {
    "msdnet cifar": _tiny_msdnet(),
    "msdnet imagenet": _tiny_msdnet_imagenet(),
    "fused msdnet cifar": fused(_tiny_msdnet()),
    "fused msdnet imagenet": fused(_tiny_msdnet_imagenet()),
    "resnet18_exits": registered("resnet18_exits"),
    "resnet18_adn": registered("resnet18_adn"),
    "convnext_tiny_exits": registered("convnext_tiny_exits", depths=(1, 1, 1, 1)),
    "efficientnet_b0_exits": registered("efficientnet_b0_exits"),
    "mobilenetv3_large_100_exits": registered("mobilenetv3_large_100_exits"),
    "vit_tiny_patch16_224_exits": registered("vit_tiny_patch16_224_exits", **_SMALL_VIT),
    "vit_tiny_patch16_224_adn": registered("vit_tiny_patch16_224_adn", **_SMALL_VIT),
    "swin_tiny_patch4_window7_224_exits": registered("swin_tiny_patch4_window7_224_exits"),
    # two flows at one resolution and the fusions' resizing; the ImageNet stem is MSDNet's
    "ranet cifar": registered("ranet_cifar_8exit", num_channels=8, growth_rate=4, step=2, head_channels=16),
    # the latent branch and its heads; the ResNet-50 variants add no operator, the MobileNetV3 ones do
    "dyn_perceiver regnety": registered("dyn_perceiver_regnety_002_cifar", num_latents=16, depths=(1, 1, 1, 1)),
    "dyn_perceiver mobilenetv3": registered("dyn_perceiver_mobilenetv3_large_075", num_latents=16,
                                            depths=(1, 1, 1, 1), input_size=(3, 64, 64)),
    **_wrappers(_tiny_msdnet(), registered("resnet18_exits")),
    **_heads("resnet18"),
}
# those the test exports with gradients on, under no_grad and inference_mode, contiguous and channels-last
# (the others: under no_grad, contiguous; in the full regeneration no model's operators changed with the
# mode or layout): the fused MSDNet writes its buffers in place, product anytime computes in float64
# around ZTW around MSDNet
EVERY_MODE = ("fused msdnet cifar", "product_anytime(ztw(msdnet))")


def runs(cases: Dict[str, Case], grad_modes: Sequence[str] = tuple(GRAD_MODES),
         layouts: Sequence[torch.memory_format] = LAYOUTS) -> Iterator[Tuple[str, Set[str]]]:
    """(what was exported, the operators its export calls) for every case, grad mode and layout."""
    for name, build in cases.items():
        for layout in layouts:
            torch.manual_seed(0)
            model, x = build()
            model, x = model.eval().to(memory_format=layout), x.contiguous(memory_format=layout)
            for mode in grad_modes:
                with GRAD_MODES[mode]():
                    yield f"{name}, {mode}, {str(layout).split('.')[-1]}", exported_operators(model, x)


def operators(cases: Dict[str, Case], **kwargs) -> List[str]:
    """The sorted union of the operators of :func:`runs`."""
    return sorted(set().union(*(ops for _, ops in runs(cases, **kwargs))))


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped list, write nothing")
    args = parser.parse_args(argv)
    found: Set[str] = set()
    for what, ops in runs(all_cases()):
        new = ops - found
        found |= ops
        print(f"{what}: {len(ops)} operators{f', new: {sorted(new)}' if new else ''}", flush=True)
    listed = sorted(found)
    shipped = json.loads(LIST.read_text())["operators"] if LIST.exists() else []
    if args.check:
        print(f"missing from the list: {sorted(set(listed) - set(shipped))}\n"
              f"listed, made by nothing: {sorted(set(shipped) - set(listed))}")
        return int(listed != shipped)
    LIST.write_text(json.dumps({"torch": torch.__version__, "timm": timm.__version__, "operators": listed},
                               indent=1) + "\n")
    print(f"wrote {len(listed)} operators to {LIST}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
