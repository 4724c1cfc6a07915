# SDN's IC-only training (Kaya et al., ICML 2019), both steps: the CNN is trained alone first (its own
# head's loss; the internal classifiers frozen and left out), with the schedule of the config; then it
# is frozen and only the internal classifiers train, on sum_i CE(IC_i) (the final head left out), with
# Adam lr 1e-3 (weight decay as the CNN's), 25 epochs, lr x0.1 at epoch 15. As in SDN's code the frozen
# backbone stays in training mode (its batch-norm statistics move): freeze_bn_stats=True fixes them.
# A phase's optimizer and scheduler replace the config's whole (free-form) sections.
phases = [
    dict(name='cnn', technique=dict(type='CrossEntropy', regime='backbone')),
    dict(name='ic_only', technique=dict(type='CrossEntropy', regime='heads_only', freeze_bn_stats=False),
         optimizer=dict(opt='adam', lr=1e-3, weight_decay=1e-4, filter_bias_and_bn=False),
         scheduler=dict(sched='multistep', decay_milestones=[15], decay_rate=0.1, warmup_epochs=0),
         train=dict(epochs=25)),
]
