# Gradient Equilibrium (IMTA phase I).
_base_ = ['./_base_.py']
technique = dict(gradient_equilibrium=True)
