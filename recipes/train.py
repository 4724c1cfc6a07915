"""The main job: ``accelerate launch recipes/train.py`` trains a small MSDNet with the IMTA techniques
on scikit-learn's embedded digits (recipes/digits.py), prints every exit's accuracy and the budgeted
curve, and saves checkpoints, weights, plots and results under output/train/.

Any other config runs the same way: ``accelerate launch recipes/train.py CONFIG [--data-dir DIR]
[--output-dir DIR] [--resume] [--cfg-options key=value ...]``. On CPU, two processes:
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/train.py``.
"""
import os
import sys

from timm_exits.engine import main

if __name__ == "__main__":
    sys.exit(main(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py")))
