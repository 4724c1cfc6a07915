# RANet (Yang et al., CVPR 2020), the reference's train_cifar.sh network: 4 flows (8x8, 16x16 and two at
# 32x32), 8 exits, 4 layers per block, growth 6, 16 stem channels; the reference's He init.
model = dict(name='ranet_cifar_8exit', kwargs=dict())
