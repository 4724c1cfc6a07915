# The ResNet50-ADN recipe: SGD lr 0.1 (global batch 256), momentum 0.9, weight decay 1e-4 (none on
# norms and biases), 150 epochs, lr x0.1 at epochs 60, 100 and 140.
optimizer = dict(opt='momentum', lr=0.1, momentum=0.9, weight_decay=1e-4, filter_bias_and_bn=True)
scheduler = dict(sched='multistep', decay_milestones=[60, 100, 140], decay_rate=0.1, warmup_epochs=0)
train = dict(epochs=150)
