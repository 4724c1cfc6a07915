# L2W-DEN (Han et al., ECCV 2022): per-sample, per-exit loss weights from a weight net (losses -> 500 -> weights),
# learnt by a meta step through one step of the network's SGD, scored on the budgeted assignment of the batch's
# other half; two halves and two optimizer steps per batch. The reference's CIFAR settings; its ImageNet ones:
# epsilon=0.3, constraint_dimension='mat', meta_interval=100. Needs an SGD optimizer (the reference:
# opt='momentum', cosine lr) and train.grad_accum_steps=1.
technique = dict(type='L2W', epsilon=0.8, constraint_dimension='col', input_type='loss', hidden_size=500,
                 meta_interval=1, lr=1e-4, weight_decay=1e-4, lr_follows_schedule=True, target_p=0.75)
