"""Helpers shared by the test modules."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY_MSDNET = "dict(name='msdnet_cifar_5exit', kwargs=dict(num_channels=4, growth_rate=2))"  # an engine config's model
MM_TINY_MSDNET = dict(model="msdnet_cifar_5exit", model_kwargs=dict(num_classes=3, num_channels=4, growth_rate=2))


def make_image_folder(root: Path, classes=3, per_class=10, size=32, seed=0) -> Path:
    """Real PNG files in ImageFolder layout; each class has its own mean colour, so it is learnable."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.normal(60 + 60 * c, 40, (size, size, 3)).clip(0, 255).astype("uint8")
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.png")
    return root


def tiny_data(root: Path) -> Path:
    """train/: 3 classes x 16 PNGs (32 after holding out 16 with val_fraction 1/3), val/: 3 x 7 (an odd count)."""
    make_image_folder(root / "train", per_class=16, seed=0)
    make_image_folder(root / "val", per_class=7, seed=1)
    return root


def write_config(path: Path, data: Path, model: str = TINY_MSDNET, extra: str = "") -> Path:
    """An engine config for the tiny data: 2 epochs of 4 batches of 8, evaluation at 32 px."""
    path.write_text(f"""
model = {model}
data = dict(dir={str(data)!r}, val_fraction=1 / 3, input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
            crop_pct=1.0, augment=dict(scale=(0.7, 1.0), hflip=0.5, color_jitter=None), batch_size=8, eval_batch_size=8,
            workers=0)
optimizer = dict(opt='momentum', lr=0.05, momentum=0.9, weight_decay=1e-4)
scheduler = dict(sched='cosine', warmup_epochs=0)
train = dict(epochs=2, log_every=1)
{extra}
""")
    return path


def randomise_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial norm statistics and affine parameters (fresh timm inits are identities), so that a
    test notices a norm that is skipped, swapped or folded wrongly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


class TinyImages(torch.utils.data.Dataset):
    """Class-coloured 32x32 images as mmengine samples (``inputs``, ``data_samples``): learnable in a few steps."""

    def __init__(self, n=48, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.images = torch.randn(n, 3, 32, 32, generator=g) * 0.5 + self.labels.view(-1, 1, 1, 1).float() - 1

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return dict(inputs=self.images[i], data_samples=self.labels[i])


def mm_loader(seed=0, shuffle=True) -> dict:
    """An mmengine dataloader config over :class:`TinyImages`, batches of 8."""
    return dict(dataset=TinyImages(seed=seed), sampler=dict(type="DefaultSampler", shuffle=shuffle),
                batch_size=8, collate_fn=dict(type="default_collate"), num_workers=0)


def mm_runner(tmp_path, model, iters=4, optim_wrapper=None, hooks=(), resume=False, name="run"):
    """A real mmengine Runner training ``MultiExitClassifier(**model)`` for ``iters`` iterations,
    validating and checkpointing (every 2 iterations) into ``tmp_path / name``."""
    from mmengine.runner import Runner

    import timm_exits.integrations.mmengine  # noqa: F401  (registers the model, metric, hooks, optim wrapper)

    return Runner(
        model=dict(type="MultiExitClassifier", **model),
        work_dir=str(tmp_path / name),
        train_dataloader=mm_loader(),
        val_dataloader=mm_loader(seed=1, shuffle=False),
        val_evaluator=dict(type="MultiExitAccuracy"),
        train_cfg=dict(by_epoch=False, max_iters=iters, val_interval=iters),
        val_cfg=dict(),
        optim_wrapper=optim_wrapper or dict(optimizer=dict(type="SGD", lr=0.05, momentum=0.9)),
        custom_hooks=list(hooks),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=2, by_epoch=False),
                           logger=dict(type="LoggerHook", interval=1)),
        resume=resume,
        randomness=dict(seed=0),
        default_scope="mmengine",
    )
