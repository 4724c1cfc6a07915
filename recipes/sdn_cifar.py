# SDN (Kaya et al., ICML 2019), SDN training on CIFAR-100: timm's ResNet-18 with internal classifiers
# at SDN's cost fractions and SDN's heads, trained jointly with the tau warm-up of the IC losses and
# SDN's 100-epoch SGD schedule (batch 128). For CIFAR-10, swap the dataset base. Evaluate early exits with the
# most-confident fallback (SDN's rule).
#   accelerate launch recipes/sdn_cifar.py --data-dir data/cifar100
_base_ = ['./_base_/datasets/cifar100_sdn.py', './_base_/models/resnet18_sdn_cifar.py', './_base_/schedules/sdn_cifar_100e.py',
          './_base_/techniques/sdn.py']
output_dir = 'output/sdn_cifar'

if __name__ == "__main__":  # accelerate launch recipes/<this file> [--data-dir ...] [--cfg-options ...]
    from timm_exits.engine import main
    raise SystemExit(main(__file__))
