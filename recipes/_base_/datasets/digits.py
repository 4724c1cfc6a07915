# scikit-learn's digits (1,797 images, 10 classes), written on first use as 32x32 grayscale PNGs in
# ImageFolder layout (train/ and val/ folders, a seeded 80/20 split): real image files, no download.
data = dict(
    dir='output/data/digits', embedded='digits', train_split='train', test_split='val',
    val_fraction=0.2,  # of train: the thresholds of the budgeted evaluation are fitted on it
    img_mode='L', input_size=(1, 32, 32), mean=(0.5, ), std=(0.5, ), crop_pct=1.0, interpolation='bilinear',
    transform='timm', augment=dict(scale=(0.8, 1.0), ratio=(0.9, 1.1), hflip=0.0, color_jitter=None),
    batch_size=64, eval_batch_size=256, workers=0)
