# MSDNet-PyTorch's CIFAR schedule: SGD lr 0.1, momentum 0.9 (no Nesterov), weight decay 1e-4 on all
# parameters (norms and biases too), batch 64, 300 epochs, lr x0.1 at epochs 150 and 225.
optimizer = dict(opt='momentum', lr=0.1, momentum=0.9, weight_decay=1e-4, filter_bias_and_bn=False)
scheduler = dict(sched='multistep', decay_milestones=[150, 225], decay_rate=0.1, warmup_epochs=0)
train = dict(epochs=300)
