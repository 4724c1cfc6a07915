# Zero Time Waste (Wolczyk et al., NeurIPS 2021) on CIFAR-100: timm's ResNet-18 with SDN-placed exits and
# ZTW's pooled heads (adaptive to 4x4); the backbone is trained alone first (SDN's 100-epoch SGD schedule),
# then ZTW's cascading heads on the frozen backbone and its geometric ensembles. Evaluate with one global
# threshold (ZTW's strict '>' test on the ensembles' max-softmax).
#   accelerate launch recipes/ztw_cifar.py --data-dir data/cifar100
_base_ = ['./_base_/datasets/cifar100_sdn.py', './_base_/models/resnet18_ztw_cifar.py',
          './_base_/schedules/sdn_cifar_100e.py', './_base_/techniques/ztw_after_backbone.py']
output_dir = 'output/ztw_cifar'

if __name__ == "__main__":  # accelerate launch recipes/<this file> [--data-dir ...] [--cfg-options ...]
    from timm_exits.engine import main
    raise SystemExit(main(__file__))
