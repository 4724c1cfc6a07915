# Zero Time Waste from scratch: the backbone alone first (its own head's loss, the schedule of the
# config), then ZTW's two phases on it, as in recipes/_base_/techniques/ztw.py.
phases = [
    dict(name='backbone', technique=dict(type='CrossEntropy', regime='backbone')),
    dict(name='heads', technique=dict(type='ZTW', train='heads', detach=True, layer_norm=True),
         optimizer=dict(opt='adam', lr=5e-3, weight_decay=1e-4), scheduler=dict(sched='cosine', warmup_epochs=0),
         train=dict(epochs=15)),
    dict(name='ensembles', technique=dict(type='ZTW', train='ensembles'),
         optimizer=dict(opt='adam', lr=1e-3, weight_decay=0.0), scheduler=dict(sched='cosine', warmup_epochs=0),
         train=dict(epochs=2)),
]
