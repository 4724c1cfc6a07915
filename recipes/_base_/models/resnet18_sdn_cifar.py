# timm's ResNet-18 with SDN's internal classifiers (Kaya et al., ICML 2019): exits placed at the units
# nearest 15, 30, ..., 90 % of the backbone's MACs and SDN's mixed max/avg-pooling heads, built for
# 32x32 images. timm's ResNets are cut into stages (layer1..layer4), so the six fractions fall on the
# three stage ends (layer1..layer3): 3 internal classifiers + the backbone's head. SDN's own CIFAR
# ResNet-56 (3x3 stem, no max-pool, exits inside the stages) is not a timm model.
model = dict(name='resnet18_exits', kwargs=dict(exits='sdn', head='sdn', input_size=(3, 32, 32)))
