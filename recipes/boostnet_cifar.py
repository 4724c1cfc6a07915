# BoostNet (Yu et al., AAAI 2023) on CIFAR-100, anytime setting: the reference's MSDNet (10 blocks, step 2,
# base 4, 16 channels) with Gradient Equilibrium, r = 0.5, and MSDNet's 300-epoch SGD schedule (batch 64,
# lr 0.1, x0.1 at epochs 150 and 225). Every exit answers with its boosted ensemble.
#   accelerate launch recipes/boostnet_cifar.py --data-dir data/cifar100
_base_ = ['./_base_/datasets/cifar100.py', './_base_/models/msdnet_cifar_anytime.py',
          './_base_/schedules/msdnet_cifar_300e.py', './_base_/techniques/boostnet.py']
output_dir = 'output/boostnet_cifar'

if __name__ == "__main__":  # accelerate launch recipes/<this file> [--data-dir ...] [--cfg-options ...]
    from timm_exits.engine import main
    raise SystemExit(main(__file__))
