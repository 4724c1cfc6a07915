# Deep Feature Surgery with its distillation: the dfs row's feature surgery, and every exit but the last
# learning from the last one (gamma 0.9, T 3, the reference's defaults for MSDNet).
_base_ = ['./_base_.py', '../../recipes/_base_/techniques/dfs_kd.py']
