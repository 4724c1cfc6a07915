# The Dynamic Perceiver reference's ImageNet schedule (main_earlyExit.py with the README's RegNetY command):
# AdamW lr 1e-3 for a global batch of 1024 (128 on each of 8 GPUs), weight decay 0.05, 20 warm-up epochs,
# cosine to 1e-6 over 300 epochs, an EMA of the weights (decay 0.9999) evaluated.
optimizer = dict(opt='adamw', lr=1e-3, weight_decay=0.05)
scheduler = dict(sched='cosine', warmup_epochs=20, warmup_lr=1e-6, min_lr=1e-6)
train = dict(epochs=300, ema_decay=0.9999)
