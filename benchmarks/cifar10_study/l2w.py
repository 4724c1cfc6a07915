# L2W-DEN: per-sample, per-exit loss weights from a weight net learnt through a virtual SGD step (the reference's
# CIFAR settings: epsilon 0.8, 'col' centring, a meta step every iteration); each batch of 64 is two halves of 32.
_base_ = ['./_base_.py', '../../recipes/_base_/techniques/l2w.py']
