# SDN training (Kaya et al., ICML 2019): the backbone and its internal classifiers train together on
# CE(final) + sum_i tau_i(e) CE(IC_i), tau_i(e) = min(C_i, 0.01 + e C_i / E), recomputed every epoch.
technique = dict(type='CrossEntropy', exit_weights='sdn', regime='joint')
