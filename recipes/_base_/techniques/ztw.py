# Zero Time Waste (Wolczyk et al., NeurIPS 2021) on a trained backbone (model.kwargs pretrained=True,
# or a weights file): phase 'heads' trains the exit heads with their cascade (detached, layer-normalised
# previous logits) on the frozen backbone, in eval mode; phase 'ensembles' then trains the geometric
# ensembles alone. Both minimise the mean over the exits of their cross-entropies. Optimizers: the
# reference's ViT-B/16 ImageNet settings (Adam lr 5e-3, weight decay 1e-4, cosine, 15 epochs; then Adam
# lr 1e-3, no weight decay, 2 epochs).
phases = [
    dict(name='heads', technique=dict(type='ZTW', train='heads', detach=True, layer_norm=True),
         optimizer=dict(opt='adam', lr=5e-3, weight_decay=1e-4), scheduler=dict(sched='cosine', warmup_epochs=0),
         train=dict(epochs=15)),
    dict(name='ensembles', technique=dict(type='ZTW', train='ensembles'),
         optimizer=dict(opt='adam', lr=1e-3, weight_decay=0.0), scheduler=dict(sched='cosine', warmup_epochs=0),
         train=dict(epochs=2)),
]
