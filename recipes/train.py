"""The main job: train a small MSDNet on an embedded dataset and report every exit's accuracy.

Runs with no arguments and no download (scikit-learn's 8x8 digits, upsampled to 32x32),
on CPU or GPUs, one process or many::

    accelerate launch recipes/train.py
    accelerate launch --multi_gpu --num_processes 2 recipes/train.py   # CPU: ACCELERATE_USE_CPU=1

Loss: the sum of the exits' cross-entropies (the MSDNet baseline).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from sklearn.datasets import load_digits
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.checkpoint import save_checkpoint
from timm_exits.train import multi_exit_cross_entropy


def digits_splits(seed: int, img_size: int = 32):
    """scikit-learn's digits as (train, test) tensor datasets of 1 x img_size x img_size images."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (F.interpolate(x, size=img_size, mode="bilinear", align_corners=False) - 0.5) / 0.5
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = order[:n_test], order[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="msdnet_cifar_5exit")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="output/train")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(args.seed)
    train_set, test_set = digits_splits(args.seed)
    model = timm.create_model(args.model, num_classes=10, in_chans=1)
    optimizer = create_optimizer_v2(model, "sgd", lr=args.lr, momentum=0.9, weight_decay=1e-4)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True)
    test_loader = DataLoader(test_set, batch_size=256)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=args.epochs, warmup_epochs=0,
                                       updates_per_epoch=len(train_loader))
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    unwrapped = accelerator.unwrap_model(model)

    start, step = time.time(), 0
    for epoch in range(args.epochs):
        model.train()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not accelerator.is_local_main_process)
        for x, y in bar:
            loss = multi_exit_cross_entropy(unwrapped.forward_exits(x), y)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            bar.set_postfix(loss=f"{loss.item():.3f}")

    model.eval()
    correct = torch.zeros(unwrapped.num_exits)
    total = 0
    with torch.no_grad():
        for x, y in test_loader:
            preds = torch.stack([logits.argmax(1) for logits in unwrapped.forward_exits(x)], 1)
            preds, y = accelerator.gather_for_metrics((preds, y))
            correct += (preds == y[:, None]).sum(0).cpu()
            total += len(y)
    accuracy = (100 * correct / total).tolist()

    if accelerator.is_main_process:
        accelerator.print(f"\n{args.model} on digits: {total} test images, {time.time() - start:.0f} s")
        accelerator.print("exit  top-1 (%)")
        for i, acc in enumerate(accuracy):
            accelerator.print(f"{i + 1:>4}  {acc:9.2f}")
        checkpoint = save_checkpoint(os.path.join(args.output, "checkpoint"), unwrapped, optimizer, scheduler,
                                     model_name=args.model, epochs=args.epochs, top1_per_exit=accuracy)
        results = os.path.join(args.output, "results.json")
        with open(results + ".tmp", "w") as f:
            json.dump({"model": args.model, "dataset": "sklearn-digits", "test_images": total,
                       "top1_per_exit": accuracy}, f, indent=2)
        os.replace(results + ".tmp", results)
        accelerator.print(f"saved {checkpoint}/ and {results}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also destroys the process group of a multi-process run


if __name__ == "__main__":
    main()
