# IMTA phase II: the phase-I (GE) network frozen, ISC heads trained with One-for-all distillation.
# Pass the phase-I weights with --cfg-options model.phase_one_checkpoint=work_dirs/.../phase1.safetensors
_base_ = ['./_base_/msdnet_cifar.py']
model = dict(loss='ofa', phase_one_checkpoint=None, isc='reference',
             loss_kwargs=dict(temperature=3.0, gamma=0.9, reduction='batchmean'))
