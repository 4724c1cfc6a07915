# JEI-DNN with the reference's schedule: the baseline's classifiers (phase 1 is the baseline configuration
# run for run), then one phase in which the gates and the heads of the exits but the last train in turns
# of 200 updates (same epochs).
_base_ = ['./_base_.py', '../../recipes/_base_/techniques/jei_gates_alternating.py']
