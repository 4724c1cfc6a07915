# Gradient deconfliction at the branch points (one backward; PCGrad between each exit's gradient and
# the deeper network's).
_base_ = ['./_base_.py']
technique = dict(deconfliction='symmetric')
