# Dynamic Perceiver's loss (the reference README's flags): 1.0 CE_cnn + 0.5 (CE_att + CE_early) + 1.0 CE_merge,
# plus 0.5 sum_{early, att, cnn} T^2 KL(sg(merge) / T || exit / T) with T = 1.
technique = dict(type='DynPerceiver', cnn_weight=1.0, att_weight=0.5, merge_weight=1.0, kd_weight=0.5, temperature=1.0)
