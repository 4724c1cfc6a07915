# IMTA: phase I with GE, then ISC heads with One-for-all KD on the frozen network (same epochs).
_base_ = ['./_base_.py', '../../recipes/_base_/techniques/imta.py']
