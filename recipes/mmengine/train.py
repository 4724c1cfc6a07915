"""Train an mmengine config of recipes/mmengine with the Runner::

    python recipes/mmengine/train.py recipes/mmengine/msdnet_cifar_ge.py --work-dir work_dirs/ge \
        --cfg-options train_cfg.max_epochs=10
"""
import argparse

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

from timm_exits.integrations.mmengine import enable_resume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--work-dir", default="work_dirs/mmengine")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --work-dir")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={}, help="key=value overrides")
    args = parser.parse_args()
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir, cfg.resume = args.work_dir, args.resume
    if args.resume:
        enable_resume()
    Runner.from_cfg(cfg).train()


if __name__ == "__main__":
    main()
