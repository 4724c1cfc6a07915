# Deep Feature Surgery (Gong et al., ECCV 2024): at each branch point the next stage passes its gradient
# back through the first half of the channels only (the coarsest scale on MSDNet); the exit reads them all.
# The exits' cross-entropies, summed; the reference's split ratio 0.5, its KD and feature-distillation
# flags off (their defaults).
technique = dict(type='CrossEntropy', feature_surgery=0.5)
