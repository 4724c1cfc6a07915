# IMTA phase I: the MSDNet baseline with Gradient Equilibrium.
_base_ = ['./_base_/msdnet_cifar.py']
custom_hooks = [dict(type='GradientEquilibriumHook')]
