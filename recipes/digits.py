# The main job's config: a small MSDNet (5 exits) trained with the IMTA techniques (phase I with
# Gradient Equilibrium, phase II with ISC heads and One-for-all distillation) on scikit-learn's
# digits, which ship with scikit-learn: no download, a few minutes on 2 CPU cores.
_base_ = ['./_base_/datasets/digits.py', './_base_/models/msdnet_digits.py', './_base_/schedules/sgd_cosine_4e.py',
          './_base_/techniques/imta.py']
output_dir = 'output/train'

if __name__ == "__main__":  # accelerate launch recipes/<this file> [--data-dir ...] [--cfg-options ...]
    from timm_exits.engine import main
    raise SystemExit(main(__file__))
