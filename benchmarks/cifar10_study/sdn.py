# SDN: ResNet-18 with SDN's heads at SDN's cost fractions (on a timm ResNet cut at stage ends: 3 internal classifiers
# + the backbone's head), trained jointly with the tau warm-up of the IC losses; the study's schedule.
_base_ = ['./_base_.py']
model = dict(name='resnet18_exits', kwargs=dict(_delete_=True, exits='sdn', head='sdn', input_size=(3, 32, 32)))
optimizer = dict(filter_bias_and_bn=True)
technique = dict(exit_weights='sdn')
