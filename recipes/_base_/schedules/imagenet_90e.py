# MSDNet-PyTorch's and IMTA's ImageNet schedule: SGD lr 0.1 (global batch 256), momentum 0.9, weight
# decay 1e-4 on all parameters, 90 epochs, lr x0.1 every 30 epochs.
optimizer = dict(opt='momentum', lr=0.1, momentum=0.9, weight_decay=1e-4, filter_bias_and_bn=False)
scheduler = dict(sched='step', decay_epochs=30, decay_rate=0.1, warmup_epochs=0)
train = dict(epochs=90)
