# Phuong & Lampert: distillation from the last exit at the adaptive temperature, the reference's defaults.
_base_ = ['./_base_.py', '../../recipes/_base_/techniques/phuong_lampert.py']
