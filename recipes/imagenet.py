# MSDNet (step 4) on ImageNet with IMTA's two phases: phase I with Gradient Equilibrium, then ISC heads
# with One-for-all KD (the ImageNet script's T = 1, gamma = 0.1) on the frozen network; 90 epochs each,
# SGD 0.1, lr x0.1 every 30 epochs, global batch 256 (on any number of processes that divides it).
#   accelerate launch --multi_gpu --num_processes 4 recipes/imagenet.py --data-dir /data/imagenet
_base_ = ['./_base_/datasets/imagenet.py', './_base_/models/msdnet_imagenet.py', './_base_/schedules/imagenet_90e.py',
          './_base_/techniques/imta_imagenet.py']
output_dir = 'output/imagenet'

if __name__ == "__main__":  # accelerate launch recipes/<this file> [--data-dir ...] [--cfg-options ...]
    from timm_exits.engine import main
    raise SystemExit(main(__file__))
