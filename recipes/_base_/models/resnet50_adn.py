# ResNet-50 with skippable sub-paths (ADN); pretrained timm weights can be loaded with
# --cfg-options model.kwargs.pretrained=True model.kwargs.pretrained_cfg_overlay.file=resnet50.safetensors
model = dict(name='resnet50_adn', kwargs=dict())
