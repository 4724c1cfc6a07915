# IMTA's two phases with the reference ImageNet script's distillation values (T 1, gamma 0.1): phase I
# with Gradient Equilibrium, then ISC heads with One-for-all KD on the frozen network.
phases = [
    dict(name='phase1_ge', technique=dict(type='CrossEntropy', gradient_equilibrium=True)),
    dict(name='phase2_isc_ofa', technique=dict(type='OneForAll', isc='reference', temperature=1.0, gamma=0.1)),
]
