# A wrapped timm backbone: ResNet-18 with an exit after each stage, the plain multi-exit loss.
_base_ = ['./_base_.py']
model = dict(name='resnet18_exits', kwargs=dict(_delete_=True))
optimizer = dict(filter_bias_and_bn=True)
