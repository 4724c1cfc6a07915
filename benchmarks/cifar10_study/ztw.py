# Zero Time Waste on ResNet-18 with exits: the backbone alone for the study's 6 epochs (its own head's loss), then
# ZTW's cascading heads on the frozen backbone (3 epochs, Adam 5e-3) and its geometric ensembles (1 epoch, Adam
# 1e-3): the reference's phases, shortened like every configuration of the study.
_base_ = ['./_base_.py', '../../recipes/_base_/techniques/ztw_after_backbone.py']
model = dict(name='resnet18_exits', kwargs=dict(_delete_=True))
optimizer = dict(filter_bias_and_bn=True)
phases = [
    dict(name='backbone', technique=dict(type='CrossEntropy', regime='backbone')),
    dict(name='heads', technique=dict(type='ZTW', train='heads', detach=True, layer_norm=True),
         optimizer=dict(opt='adam', lr=5e-3, weight_decay=1e-4), scheduler=dict(sched='cosine', warmup_epochs=0),
         train=dict(epochs=3)),
    dict(name='ensembles', technique=dict(type='ZTW', train='ensembles'),
         optimizer=dict(opt='adam', lr=1e-3, weight_decay=0.0), scheduler=dict(sched='cosine', warmup_epochs=0),
         train=dict(epochs=1)),
]
