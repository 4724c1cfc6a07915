# The main job's short schedule: SGD lr 0.1, momentum 0.9, weight decay 1e-4 on all parameters,
# cosine decay without warm-up, 4 epochs (per phase).
optimizer = dict(opt='momentum', lr=0.1, momentum=0.9, weight_decay=1e-4, filter_bias_and_bn=False)
scheduler = dict(sched='cosine', warmup_epochs=0)
train = dict(epochs=4, seed=0)
