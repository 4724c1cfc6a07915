# JEI-DNN (Regol et al., ICLR 2024) with the reference's schedule: after the classifiers' training, one
# phase in which the gates and the classifiers take turns of 200 optimizer updates, the gates first
# (the reference's bilevel_batch_count). In the classifiers' turn the heads of the exits but the last
# train on the mean of their cross-entropies (the reference's gate-weighted loss, which equals it),
# the rest of the network frozen; in the gates' turn the gates train on the oracle exits. The first
# phase stands for the reference's start, a trained backbone with warmed-up intermediate classifiers;
# on a pretrained timm backbone with exits the reference's warm-up loss is
#     technique=dict(type='CrossEntropy', regime='heads_only', exit_weights=[K-1, ..., 2, 1, 1])
# (exit l weighted K-1-l; the frozen last exit left out), without its early stopping per classifier.
phases = [
    dict(name='classifiers', technique=dict(type='CrossEntropy')),
    dict(name='alternating', technique=dict(type='JEIGates', tradeoff=0.7, alternate_every=200),
         evaluation=dict(policy='gate')),
]
