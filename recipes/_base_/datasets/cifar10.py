# CIFAR-10 as ImageFolder folders under --data-dir (train/ and val/, one folder per class), with the
# MSDNet reference pipeline: pad 4, random 32x32 crop and flip for training, normalisation only for
# evaluation. 5,000 training images are held out (seeded) for the budgeted thresholds, as the
# reference's --use-valid does.
data = dict(
    dir=None, train_split='train', test_split='val', val_fraction=0.1, split_seed=0,
    input_size=(3, 32, 32), mean=(0.4914, 0.4824, 0.4467), std=(0.2471, 0.2435, 0.2616),
    transform='pad_crop', batch_size=64, eval_batch_size=256)
