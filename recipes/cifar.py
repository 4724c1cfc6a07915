# MSDNet on CIFAR-100 with IMTA (ICCV 2019): the Table 1 network (7 exits), phase I with Gradient
# Equilibrium, then phase II (ISC + One-for-all KD) on the frozen network, each with the reference's
# 300-epoch schedule; 5,000 training images held out for the budgeted thresholds. For CIFAR-10, swap
# the dataset base (the class count comes from the data):
#   _base_ = ['recipes/_base_/datasets/cifar10.py', <the other three bases below>]
#   accelerate launch recipes/cifar.py --data-dir data/cifar100
_base_ = ['./_base_/datasets/cifar100.py', './_base_/models/msdnet_cifar.py', './_base_/schedules/msdnet_cifar_300e.py',
          './_base_/techniques/imta.py']
output_dir = 'output/cifar'

if __name__ == "__main__":  # accelerate launch recipes/<this file> [--data-dir ...] [--cfg-options ...]
    from timm_exits.engine import main
    raise SystemExit(main(__file__))
