# The main job's MSDNet: msdnet_cifar_5exit (lin_grow, step 1, base 1) narrowed for 8 x 8 digits (shown
# at 32 x 32): 4 channels at the finest scale, growth 2 and exit heads of 6 channels, so that the
# early exits are clearly weaker than the last one and the budgeted curve rises with the cost
# (0.38 to 4.47 MMACs per image).
model = dict(name='msdnet_cifar_5exit', kwargs=dict(num_channels=4, growth_rate=2, head_channels=6))
