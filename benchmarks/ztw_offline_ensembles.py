"""ZTW's phase B fitted offline, as ZTW's original code does, from the accuracy study's ZTW run.

The study's ZTW configuration trains the ensembles on the live outputs for one epoch; this script
takes the same run's phase-A weights (heads and cascade on the frozen backbone), fits the ensembles
with :func:`timm_exits.train.fit_ensembles_offline` on the cached log-probabilities of the run's
training images (not augmented) and prints the test top-1 of every exit, the cascade's alone first:

    python benchmarks/accuracy_cifar10.py --data-dir ../shared/datasets/cifar10-jpeg --configs ztw
    python benchmarks/ztw_offline_ensembles.py --data-dir ../shared/datasets/cifar10-jpeg [--epochs 501]
"""
import argparse
import json
import os
import time

import timm
from accelerate import Accelerator
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Subset

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.inference import evaluate
from timm_exits.engine import Splits  # the run's own splits, seeded as in training
from timm_exits.models.ztw import ZTWModel
from timm_exits.train import fit_ensembles_offline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--run", default="output/cifar10_study/ztw", help="the study's ZTW run folder")
    parser.add_argument("--epochs", type=int, default=501, help="the original's default (10 on ImageNet)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    config = json.load(open(os.path.join(args.run, "run.json")))["config"]
    config["data"]["dir"] = args.data_dir
    data = Splits(config, Accelerator(cpu=True))
    model = ZTWModel(timm.create_model(config["model"]["name"], num_classes=data.num_classes,
                                       **config["model"]["kwargs"]))
    data_config = data.set_transforms(config, model)
    model.load_state_dict(load_file(os.path.join(args.run, "heads", "model.safetensors")))
    loader = lambda dataset: DataLoader(dataset, batch_size=256, num_workers=2)  # noqa: E731

    def top1() -> str:
        report = evaluate(model, loader(data.test), input_size=data_config["input_size"], progress=True)
        return " / ".join(f"{e['top1']:.2f}" for e in report["exits"])

    model.use_ensembles = False
    print(f"phase A (the cascade's answers): {top1()}")
    start = time.time()
    losses = fit_ensembles_offline(model, loader(Subset(data.held_out_files, data.train.indices)), epochs=args.epochs,
                                   lr=args.lr, batch_size=args.batch_size)
    print(f"phase B offline, {args.epochs} epochs ({time.time() - start:.0f} s, loss {losses[0]:.4f} -> "
          f"{losses[-1]:.4f}): {top1()}")


if __name__ == "__main__":
    main()
