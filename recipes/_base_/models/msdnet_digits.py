# The main job's MSDNet: msdnet_cifar_5exit (lin_grow, step 1, base 1) made small enough for digits.
model = dict(name='msdnet_cifar_5exit', kwargs=dict())
