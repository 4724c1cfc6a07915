# Fine-tuning from pretrained weights: SGD lr 0.01, momentum 0.9, weight decay 1e-4, one warm-up epoch,
# then cosine decay over 30 epochs.
optimizer = dict(opt='momentum', lr=0.01, momentum=0.9, weight_decay=1e-4)
scheduler = dict(sched='cosine', warmup_epochs=1)
train = dict(epochs=30)
