# Deep Feature Surgery: the baseline's exits' cross-entropies, with the next stage's gradient stopped at
# the last half of the coarsest scale's channels at each branch point.
_base_ = ['./_base_.py', '../../recipes/_base_/techniques/dfs.py']
