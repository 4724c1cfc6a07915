# timm's ResNet-18 with exits placed as SDN places them (the units nearest 15, 30, ..., 90 % of the
# backbone's MACs: the three stage ends layer1..layer3 at 32x32) and ZTW's own pooled heads (Wolczyk et
# al., NeurIPS 2021): mixed max/avg pooling adaptive to 4x4 on every map (layer3's 2x2 map too), flatten,
# linear. SDN's heads (resnet18_sdn_cifar.py) leave a 2x2 map unpooled and pool a 6x6 one to 6x6.
model = dict(name='resnet18_exits', kwargs=dict(exits='sdn', head='ztw', input_size=(3, 32, 32)))
