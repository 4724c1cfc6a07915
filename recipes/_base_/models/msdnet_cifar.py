# IMTA Table 1's MSDNet (7 exits, lin_grow, step 1, base 1); reference init (PyTorch defaults).
model = dict(name='msdnet_cifar_7exit', kwargs=dict())
