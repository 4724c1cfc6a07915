# Dynamic Perceiver (Han et al., ICCV 2023) on RegNetY-800MF with 128 latents: the reference's
# reg800m_perceiver_t128 with its README flags (self-attention layers 3, 3, 9, 6; MLP ratio 4), whose
# released ImageNet checkpoint loads through pretrained_cfg_overlay=dict(file=...).
model = dict(name='dyn_perceiver_regnety_008', kwargs=dict())
