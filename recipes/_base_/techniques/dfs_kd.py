# Deep Feature Surgery (Gong et al., ECCV 2024) with its optional distillation (--useKD 1): feature surgery
# at ratio 0.5, and every exit but the last learns from the labels (weight 1 - gamma) and from the last
# exit's softened prediction (detached, weight gamma, temperature T, no T^2); the last exit from the labels.
# gamma = 0.9 and T = 3 are the reference's defaults for MSDNet (its help text gives 0.3 for ResNet-18).
technique = dict(type='DFSDistillation', feature_surgery=0.5, gamma=0.9, temperature=3.0)
