# Dynamic Perceiver (Han et al., ICCV 2023) in place of the study's MSDNet, with its own loss (the README's
# weights and KD from the merged exit): timm's RegNetY-200MF as the CNN branch and 64 latents with the
# reference's latent depths (3, 3, 9, 6), which puts its last exit at 33.7 MMACs against the MSDNet's 28.5
# (exits at 12.7 / 30.7 / 33.3 / 33.7). The reference's optimizer, AdamW (lr 1e-3, weight decay 0.05, none on
# norms and biases), on the study's cosine schedule: the study's SGD at lr 0.1 sends the attention branch to
# NaN within 20 steps.
_base_ = ['./_base_.py', '../../recipes/_base_/techniques/dyn_perceiver.py']
model = dict(name='dyn_perceiver_regnety_002_cifar', kwargs=dict(_delete_=True))
optimizer = dict(_delete_=True, opt='adamw', lr=1e-3, weight_decay=0.05, filter_bias_and_bn=True)
