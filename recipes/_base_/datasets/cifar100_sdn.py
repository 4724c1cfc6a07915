# CIFAR-100 as in recipes/_base_/datasets/cifar100.py, with SDN's batch of 128.
_base_ = ['./cifar100.py']
data = dict(batch_size=128)
