# SDN's CIFAR schedule: SGD lr 0.1, momentum 0.9, weight decay 1e-4 on all parameters (5e-4 for VGG and
# WRN), 100 epochs, lr x0.1 at epochs 35, 60 and 85 (1-based, as SDN's scheduler).
optimizer = dict(opt='momentum', lr=0.1, momentum=0.9, weight_decay=1e-4, filter_bias_and_bn=False)
scheduler = dict(sched='multistep', decay_milestones=[35, 60, 85], decay_rate=0.1, warmup_epochs=0)
train = dict(epochs=100)
