# SDN (Kaya et al., ICML 2019), IC-only training on CIFAR-100: phase 'cnn' trains timm's ResNet-18
# alone with SDN's 100-epoch SGD schedule, phase 'ic_only' freezes it and trains SDN's internal
# classifiers with Adam (25 epochs). Each phase is evaluated in its own folder.
#   accelerate launch recipes/sdn_cifar_ic_only.py --data-dir data/cifar100
_base_ = ['./_base_/datasets/cifar100_sdn.py', './_base_/models/resnet18_sdn_cifar.py', './_base_/schedules/sdn_cifar_100e.py',
          './_base_/techniques/sdn_ic_only.py']
output_dir = 'output/sdn_cifar_ic_only'

if __name__ == "__main__":  # accelerate launch recipes/<this file> [--data-dir ...] [--cfg-options ...]
    from timm_exits.engine import main
    raise SystemExit(main(__file__))
