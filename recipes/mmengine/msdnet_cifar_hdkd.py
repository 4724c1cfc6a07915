# HDKD: dense distillation with harmonized weights, updated every 4th iteration on a held-out split
# (DATA_ROOT/holdout, never the test images).
_base_ = ['./_base_/msdnet_cifar.py']
model = dict(loss='hdkd', loss_kwargs=dict(alpha=0.5, temperature=4.0))
custom_hooks = [dict(
    type='HarmonizedWeightsHook', lr=3e-4, interval=4,
    val_dataloader=dict(
        dataset=dict(type='ImageFolderDataset', root='{{ $DATA_ROOT:data/cifar10 }}/holdout', data_config={{_base_.data_config}}),
        sampler=dict(type='DefaultSampler', shuffle=True), batch_size=64, num_workers=1,
        collate_fn=dict(type='default_collate')))]
