# Gradient deconfliction (ICIP 2020) as parameter-level PCGrad between the exits' gradients.
_base_ = ['./_base_/msdnet_cifar.py']
model = dict(technique=dict(type='PCGrad', scope='global', order='random', protect_deeper=False))
