# A wrapped timm backbone: ResNet-50 with an exit after each stage, fine-tuned from timm weights with
# Gradient Equilibrium (the last exit is the backbone's own head, so it starts at its accuracy):
#   accelerate launch recipes/resnet50_exits.py --data-dir /data/imagenet \
#       --cfg-options model.kwargs.pretrained=True model.kwargs.pretrained_cfg_overlay.file=resnet50.safetensors
_base_ = ['./_base_/datasets/imagenet.py', './_base_/models/resnet50_exits.py', './_base_/schedules/finetune_30e.py',
          './_base_/techniques/ge.py']
output_dir = 'output/resnet50_exits'

if __name__ == "__main__":  # accelerate launch recipes/<this file> [--data-dir ...] [--cfg-options ...]
    from timm_exits.engine import main
    raise SystemExit(main(__file__))
