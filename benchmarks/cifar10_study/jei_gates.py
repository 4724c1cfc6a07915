# JEI-DNN: the baseline's classifiers (phase 1 is the baseline configuration run for run), then learned
# exit gates on the frozen network (same epochs).
_base_ = ['./_base_.py', '../../recipes/_base_/techniques/jei_gates.py']
