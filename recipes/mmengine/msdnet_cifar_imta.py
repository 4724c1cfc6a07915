# IMTA phase II: the phase-I (GE) network frozen, ISC heads trained with One-for-all distillation.
# Pass the phase-I weights with --cfg-options model.previous=work_dirs/.../phase1.safetensors
_base_ = ['./_base_/msdnet_cifar.py']
model = dict(previous=None,
             technique=dict(_delete_=True, type='OneForAll', isc='reference', temperature=3.0, gamma=0.9,
                            reduction='batchmean'))
