# HDKD: dense distillation with harmonized weights learned on the validation split (every 4th step).
_base_ = ['./_base_.py', '../../recipes/_base_/techniques/hdkd.py']
technique = dict(interval=4)
