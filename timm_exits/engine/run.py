"""Every phase of a config, and the command line of the recipes."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Dict, List, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import (DistributedDataParallelKwargs, broadcast_object_list)
from mmengine.config import DictAction

from ..cpu import bf16_advice, cpu_bf16
from ..config import load_config, phase_configs
from ..errors import AnotherProcessStopped, is_user_error, report_user_error
from ..files import write_json
from ..train.techniques import build_technique
from .checks import check_factories
from .phase import train_phase
from .run_folder import LOG_FILE, SAFE_TO_CHANGE, claim_output_dir, saved_checkpoint
from .run_log import RunLog


def run(config: Dict[str, Any], resume: bool = False, extend_epochs: bool = False) -> List[Dict[str, Any]]:
    """Every phase of a resolved config, in order.

    Args:
        config: a resolved config (see :func:`timm_exits.config.load_config`).
        resume: continue the run in ``config['output_dir']`` (refusing a changed config, see
            :func:`resume_changes`); without it, a folder that holds a run is kept and this run
            writes to ``<output_dir>-1`` (-2, ...).
        extend_epochs: with ``resume``, allow more epochs than the run was started with.

    Returns:
        The phases' evaluation reports, in order.
    """
    runs = phase_configs(config)
    for _, phase in runs:
        check_factories(phase)
    train_cfg = config["train"]
    find_unused = any(build_technique(c["technique"]).unused_parameters for _, c in runs)  # ADN's base-net skips blocks
    if train_cfg["mixed_precision"] == "bf16" and not torch.cuda.is_available() and cpu_bf16() == "":
        print(f"warning: {bf16_advice()}", file=sys.stderr)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=train_cfg["mixed_precision"],
                              gradient_accumulation_steps=train_cfg["grad_accum_steps"],
                              log_with=config["tracker"], project_dir=config["output_dir"],
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)])
    lock, logging, started = None, contextlib.ExitStack(), True
    try:
        if accelerator.is_main_process:
            try:
                lock, extended, run_id = claim_output_dir(accelerator, config, resume, extend_epochs)
            except Exception as e:  # the others wait for the folder: tell them there is none
                if accelerator.num_processes > 1 and is_user_error(e):
                    broadcast_object_list([None, None, None])
                raise
            folder = [lock.folder, extended, run_id]
        else:
            folder = [None, None, None]
        output_dir, extended, run_id = broadcast_object_list(folder)
        if output_dir is None:
            raise AnotherProcessStopped("the main process refused the output folder")
        config = {**config, "output_dir": output_dir}
        log = None
        if accelerator.is_main_process:  # from here on, what the run prints goes to its log.txt too
            log = logging.enter_context(contextlib.closing(RunLog(os.path.join(output_dir, LOG_FILE), sys.stdout)))
            logging.enter_context(contextlib.redirect_stdout(log))
        if config["tracker"]:
            accelerator.project_configuration.set_directories(output_dir)
            accelerator.init_trackers("tensorboard", config={"model": config["model"]["name"]})
        reports, previous = [], None
        for name, phase in phase_configs(config):
            folder = output_dir if len(runs) == 1 else os.path.join(output_dir, name)
            reports.append(train_phase(accelerator, phase, folder, name, previous, resume, name in extended, run_id,
                                       log))
            previous = os.path.join(folder, "model.safetensors")
        if accelerator.is_main_process:
            log.open()
            path = os.path.join(output_dir, "results.json")
            write_json(path, {"config": config, "phases": reports}, default=str)
            accelerator.print(f"results of every phase: {path}")
        return reports
    except BaseException:  # before its first checkpoint, a run leaves nothing behind: the fixed command reuses the folder
        started = lock is None or saved_checkpoint(lock)
        raise
    finally:
        logging.close()
        accelerator.end_training()  # also destroys the process group of a multi-process run
        if lock is not None:
            lock.release() if started else lock.abandon()


def main(default_config: Optional[str] = None, argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """Command line of the recipes: ``CONFIG [--data-dir] [--output-dir] [--resume [--extend-epochs]]
    [--cfg-options k=v ...]``.

    Args:
        default_config: the config file when none is given (a recipe's own).
        argv: the arguments (default: ``sys.argv[1:]``).
        prog: the program name in the usage line.

    Returns:
        The exit code: 0, or 2 after printing ``error: ...`` for a user mistake.
    """
    parser = argparse.ArgumentParser(prog=prog, description="Train a multi-exit model from an mmengine config with "
                                                            "accelerate.")
    parser.add_argument("config", nargs="?" if default_config else None, default=default_config,
                        help="an mmengine config file (recipes/*.py or one inheriting them)")
    parser.add_argument("--data-dir", default=None, help="the data root (overrides data.dir)")
    parser.add_argument("--output-dir", default=None,
                        help="where checkpoints and results go (overrides output_dir); if it holds another run, "
                             "this one writes to <output-dir>-1 (-2, ...) unless --resume")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir where it stopped (same config; "
                             f"{', '.join(SAFE_TO_CHANGE)} may change)")
    parser.add_argument("--extend-epochs", action="store_true",
                        help="with --resume: allow more train.epochs than the run was started with (the run goes "
                             "on with the learning-rate schedule of the longer run)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                        help="override config keys: train.epochs=3 optimizer.lr=0.05")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    if args.extend_epochs and not args.resume:
        parser.error("--extend-epochs extends a run: use it with --resume")
    try:
        config = load_config(args.config, args.data_dir, args.output_dir, args.cfg_options)
        if args.print_config:
            print(json.dumps(config, indent=2, default=str))
            return 0
        run(config, args.resume, args.extend_epochs)
    except Exception as e:
        if not is_user_error(e):
            raise
        # bad input: its message, not a traceback (in a multi-process run the launcher stops the others)
        if not isinstance(e, AnotherProcessStopped):
            report_user_error(e)
        return 2
    return 0
