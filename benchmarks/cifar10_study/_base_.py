# The CIFAR-10 accuracy study: the 50,000 training JPEGs of --data-dir split once, seeded,
# into test (5,000), validation (5,000: the budgeted thresholds, HDKD's weights) and train (40,000);
# a narrow MSDNet (5 exits) with the reference's CIFAR augmentation and SGD, a cosine schedule.
data = dict(dir=None, train_split='train', test_split=None, test_fraction=0.1, val_fraction=0.1, split_seed=0,
            input_size=(3, 32, 32), mean=(0.4914, 0.4824, 0.4467), std=(0.2471, 0.2435, 0.2616),
            transform='pad_crop', batch_size=64, eval_batch_size=256, workers=2)
model = dict(name='msdnet_cifar_5exit', kwargs=dict(num_channels=8, growth_rate=4))
optimizer = dict(opt='momentum', lr=0.1, momentum=0.9, weight_decay=1e-4, filter_bias_and_bn=False)
scheduler = dict(sched='cosine', warmup_epochs=0)
train = dict(epochs=6, seed=0, checkpoint_every=200)
evaluation = dict(q_grid='reference')
