# ImageNet-1k as ImageFolder folders (or tars) under --data-dir: train/ and val/. timm's training
# transform (RandomResizedCrop 224, flip; no colour jitter, as the MSDNet reference) and resize 256 /
# centre crop 224 for evaluation. 50,000 training images are held out for the budgeted thresholds.
# batch_size is the global batch of the references, 256 (64 per process on 4 processes).
data = dict(
    dir=None, train_split='train', test_split='val', val_fraction=50000 / 1281167, split_seed=0,
    input_size=(3, 224, 224), crop_pct=0.875, interpolation='bilinear',
    transform='timm', augment=dict(color_jitter=None), batch_size=256, eval_batch_size=128)
