# MSDNet-PyTorch's CIFAR anytime network (10 blocks, step 2, base 4, 16 channels), BoostNet's CIFAR-100
# anytime backbone.
model = dict(name='msdnet_cifar_anytime_10exit', kwargs=dict())
