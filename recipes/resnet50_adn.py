# ResNet-50 ADN (NeurIPS 2024) on ImageNet: super-net CE + base-net self-distillation, the paper's
# 150-epoch SGD recipe (global batch 256, on any number of processes that divides it). Evaluated: every exit of the super-net.
#   accelerate launch --multi_gpu --num_processes 4 recipes/resnet50_adn.py --data-dir /data/imagenet
_base_ = ['./_base_/datasets/imagenet.py', './_base_/models/resnet50_adn.py', './_base_/schedules/adn_imagenet_150e.py',
          './_base_/techniques/adn.py']
output_dir = 'output/resnet50_adn'

if __name__ == "__main__":  # accelerate launch recipes/<this file> [--data-dir ...] [--cfg-options ...]
    from timm_exits.engine import main
    raise SystemExit(main(__file__))
