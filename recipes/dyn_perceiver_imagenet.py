# Dynamic Perceiver on RegNetY-800MF (Han et al., ICCV 2023) on ImageNet as the reference's README trains it:
# its loss (1.0 / 0.5 / 1.0 cross-entropies, KD from the merged exit, alpha 0.5, T 1), AdamW 1e-3 for a
# global batch of 1024 over 300 epochs with an EMA, and its timm-style augmentation: RandAugment
# rand-m9-mstd0.5-inc1, random erasing 0.25, bicubic, label smoothing 0.1, mixup 0.8 / cutmix 1.0.
#   accelerate launch --multi_gpu --num_processes 8 recipes/dyn_perceiver_imagenet.py --data-dir /data/imagenet
_base_ = ['./_base_/datasets/imagenet.py', './_base_/models/dyn_perceiver_regnety_008.py',
          './_base_/schedules/dyn_perceiver_imagenet_300e.py', './_base_/techniques/dyn_perceiver.py']
data = dict(interpolation='bicubic', batch_size=1024,
            augment=dict(auto_augment='rand-m9-mstd0.5-inc1', color_jitter=0.4, re_prob=0.25))
mixup = dict(mixup_alpha=0.8, cutmix_alpha=1.0)
technique = dict(label_smoothing=0.1)
output_dir = 'output/dyn_perceiver_imagenet'

if __name__ == "__main__":  # accelerate launch recipes/<this file> [--data-dir ...] [--cfg-options ...]
    from timm_exits.engine import main
    raise SystemExit(main(__file__))
