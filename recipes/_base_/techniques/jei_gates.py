# JEI-DNN (Regol et al., ICLR 2024) as two phases: the classifiers train on the sum of the exits'
# cross-entropies (the reference's gate-weighted classifier loss equals that sum, in value and
# gradient), then learned exit gates train on the frozen network against the oracle exits
# (cross-entropy + 0.7 x normalised cost), with the same split and schedule. The reference alternates
# the two every 200 batches after a warm-up; here they are two phases, one after the other. The gate
# phase is evaluated with the learned gates as the exit policy (their probabilities as the scores).
phases = [
    dict(name='classifiers', technique=dict(type='CrossEntropy')),
    dict(name='gates', technique=dict(type='JEIGates', tradeoff=0.7), evaluation=dict(policy='gate')),
]
