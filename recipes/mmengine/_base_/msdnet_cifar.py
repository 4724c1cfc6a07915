# MSDNet on an ImageFolder copy of CIFAR (train/ and val/ class folders under DATA_ROOT), trained
# with the sum of the exits' cross-entropies: the MSDNet baseline that the technique configs extend.
custom_imports = dict(imports=['timm_exits.integrations.mmengine'], allow_failed_imports=False)
default_scope = 'mmengine'
data_root = '{{ $DATA_ROOT:data/cifar10 }}'
data_config = dict(input_size=(3, 32, 32), mean=(0.4914, 0.4824, 0.4467), std=(0.2471, 0.2435, 0.2616),
                   crop_pct=1.0, interpolation='bilinear')

model = dict(type='MultiExitClassifier', model='msdnet_cifar_7exit', model_kwargs=dict(num_classes=10),
             technique=dict(type='CrossEntropy'))
# under DDP (a launcher other than 'none') the model trains through its technique's step in our wrapper
model_wrapper_cfg = dict(type='MultiExitDistributedDataParallel')

train_dataloader = dict(
    dataset=dict(type='ImageFolderDataset', root=data_root + '/train', data_config=data_config, train=True,
                 scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5, color_jitter=None),
    sampler=dict(type='DefaultSampler', shuffle=True), batch_size=64, num_workers=2,
    collate_fn=dict(type='default_collate'))
val_dataloader = dict(
    dataset=dict(type='ImageFolderDataset', root=data_root + '/val', data_config=data_config),
    sampler=dict(type='DefaultSampler', shuffle=False), batch_size=256, num_workers=2,
    collate_fn=dict(type='default_collate'))
val_evaluator = dict(type='MultiExitAccuracy')

# the MSDNet CIFAR schedule: SGD 0.1, momentum 0.9, wd 1e-4, 300 epochs, x0.1 at 150 and 225
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4))
param_scheduler = dict(type='MultiStepLR', by_epoch=True, milestones=[150, 225], gamma=0.1)
train_cfg = dict(by_epoch=True, max_epochs=300, val_interval=10)
val_cfg = dict()
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=10, max_keep_ckpts=2),
                     logger=dict(type='LoggerHook', interval=50))
randomness = dict(seed=0)
