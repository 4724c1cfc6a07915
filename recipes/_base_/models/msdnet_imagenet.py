# MSDNet for ImageNet, step 4 (5 exits, 4 scales).
model = dict(name='msdnet_imagenet_5exit', kwargs=dict())
