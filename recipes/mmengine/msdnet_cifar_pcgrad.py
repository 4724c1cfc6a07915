# Gradient deconfliction (ICIP 2020) as parameter-level PCGrad between the exits' gradients.
_base_ = ['./_base_/msdnet_cifar.py']
optim_wrapper = dict(type='PCGradOptimWrapper', scope='global', order='random', protect_deeper=False)
