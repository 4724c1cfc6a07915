# Dynamic Perceiver (Han et al., ICCV 2023) in place of the study's MSDNet, with its own loss (the README's
# weights and KD from the merged exit): timm's RegNetY-200MF as the CNN branch and 64 latents with the
# reference's latent depths (3, 3, 9, 6), which puts its last exit at 33.7 MMACs against the MSDNet's 28.5
# (exits at 12.7 / 30.7 / 33.3 / 33.7). Trained with the study's SGD schedule, like every other row.
_base_ = ['./_base_.py', '../../recipes/_base_/techniques/dyn_perceiver.py']
model = dict(name='dyn_perceiver_regnety_002_cifar', kwargs=dict(_delete_=True))
