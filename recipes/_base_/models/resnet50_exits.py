# timm's ResNet-50 with an exit after each stage; the backbone's own head stays the last exit.
model = dict(name='resnet50_exits', kwargs=dict())
