# HDKD: dense distillation with harmonized weights, updated every 4th optimizer update on a held-out
# split (DATA_ROOT/holdout, never the test images).
_base_ = ['./_base_/msdnet_cifar.py']
model = dict(technique=dict(type='HDKD', alpha=0.5, temperature=4.0, lr=3e-4, interval=4))
custom_hooks = [dict(
    type='HeldOutBatchesHook',
    dataloader=dict(
        dataset=dict(type='ImageFolderDataset', root='{{ $DATA_ROOT:data/cifar10 }}/holdout', data_config={{_base_.data_config}}),
        sampler=dict(type='DefaultSampler', shuffle=True), batch_size=64, num_workers=1,
        collate_fn=dict(type='default_collate')))]
