# MSDNet baseline: the sum of the exits' cross-entropies.
_base_ = ['./_base_.py']
