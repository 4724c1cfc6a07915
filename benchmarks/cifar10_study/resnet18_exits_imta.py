# ResNet-18 with exits, with the IMTA techniques (phase I with GE, phase II with ISC + OFA).
_base_ = ['./resnet18_exits.py', '../../recipes/_base_/techniques/imta.py']
