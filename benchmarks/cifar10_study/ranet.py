# RANet (Yang et al., CVPR 2020) in place of the study's MSDNet, trained like the baseline (the sum of the
# exits' cross-entropies, as the reference trains it): the reference's default 3-flow network (6 exits) at
# the study MSDNet's widths (8 stem channels, growth 4), which puts its last exit at 30.6 MMACs against the
# MSDNet's 28.5 (its fifth exit, 28.5 MMACs, matches it); narrower growth is refused (a fusion layer needs
# at least one channel from the previous flow).
_base_ = ['./_base_.py']
model = dict(name='ranet_cifar_6exit', kwargs=dict(_delete_=True, num_channels=8, growth_rate=4))
