# IMTA's two phases (Li et al., ICCV 2019): phase I trains the network with Gradient Equilibrium;
# phase II freezes it and trains new heads with Inline Subnetwork Collaboration and One-for-all
# distillation from the frozen last exit, on the same split and with the same schedule.
# T and gamma: the reference code's defaults (3.0, 0.9); its ImageNet script uses 1.0 and 0.1.
phases = [
    dict(name='phase1_ge', technique=dict(type='CrossEntropy', gradient_equilibrium=True)),
    dict(name='phase2_isc_ofa', technique=dict(type='OneForAll', isc='reference', temperature=3.0, gamma=0.9,
                                               reduction='batchmean')),
]
