# L2W-DEN: per-sample, per-exit loss weights from a weight net learnt through a virtual SGD step (the reference's
# CIFAR settings: epsilon 0.8, 'col' centring), each batch of 64 two halves of 32. The study's one departure: the meta
# step on every 10th batch (the reference: every batch on CIFAR, every 100th on ImageNet). Here a batch with a meta
# step costs 6.2x a batch of the baseline (one thread): every batch would take this 6-epoch run to about 7 hours.
_base_ = ['./_base_.py', '../../recipes/_base_/techniques/l2w.py']
technique = dict(meta_interval=10)
