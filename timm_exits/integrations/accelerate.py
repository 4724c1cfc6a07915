"""The accelerate training engine that runs every recipe.

``accelerate launch recipes/cifar.py --data-dir data/cifar10`` (or ``timm-exits train CONFIG``)
reads an mmengine config (:mod:`timm_exits.config`) and, for each of its phases:

1. builds the data with timm (ImageFolder or tar splits, timm transforms, mixup / cutmix), the
   model with ``timm.create_model``, the optimizer, scheduler and EMA with timm's factories;
2. trains under an :class:`accelerate.Accelerator` (one process, DDP or FSDP on one or many
   machines, as ``accelerate config`` / ``accelerate launch`` say; mixed precision, bf16 on CPU too;
   gradient accumulation) with the technique of the config, the same technique object the mmengine
   adapters and the timm task use (:mod:`timm_exits.train.techniques`);
3. checkpoints (safetensors + weights-only training state, atomic) every epoch and every
   ``train.checkpoint_every`` steps; ``--resume`` continues exactly where a killed run stopped;
4. evaluates: anytime accuracy per exit and the budgeted curve (thresholds on the held-out split),
   printed, written as ``evaluation.json`` and ``evaluation.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import gc
import json
import math
import os
import sys
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import (DistributedDataParallelKwargs, broadcast_object_list, gather_object,
                               set_seed)
from mmengine.config import DictAction
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .. import models  # noqa: F401  (registers the models with timm)
from .. import profile as profiling
from ..checkpoint import load_checkpoint, save_checkpoint, set_rng_state, rng_state, training_state
from ..cpu import bf16_advice, cpu_bf16
from ..config import PREPROCESSING, ConfigError, load_config, phase_configs, resolve_preprocessing
from ..errors import AnotherProcessStopped, is_user_error, report_user_error
from ..files import OutputLock, atomic_file, check_writable, claim_fresh_folder, read_json, recover_folder, write_json
from ..data import (EpochSampler, ImageFiles, class_map, class_names, image_transform, loader_workers, num_classes_of,
                    seeded_order, write_digits)
from ..inference.budgeted import Q_GRIDS
from ..model_folder import CONFIG_FILE, WEIGHTS_FILE, save_model_folder
from ..models.capabilities import is_multi_exit
from ..inference.outputs import anytime_accuracy, collect_outputs
from ..inference.report import evaluation_report, format_report, write_report
from ..train.l2w import L2W
from ..train.techniques import HDKD, PCGrad, TrainingForward, create_technique, create_training_model

__all__ = ["main", "run", "train_phase", "TrainingPhase"]

EMBEDDED = {"digits": write_digits}
MIN_VAL_IMAGES = 100  # held-out images below which the budgeted thresholds are warned to be noisy


class _Data:
    """The splits of one run: training (augmented), held-out validation and test (both not)."""

    def __init__(self, config: Dict[str, Any], accelerator: Accelerator):
        data = config["data"]
        if data["dir"] is None:
            raise ValueError("no data: pass --data-dir (an ImageFolder root with train/ and val/ folders, or tars)")
        if data["embedded"] is not None:
            if data["embedded"] not in EMBEDDED:
                raise ValueError(f"data.embedded must be one of {list(EMBEDDED)} or None, got {data['embedded']!r}")
            with accelerator.main_process_first():
                EMBEDDED[data["embedded"]](data["dir"])
        seed, mode, check = config["train"]["seed"], data["img_mode"], data["check_files"]
        files = lambda split: _main_first(accelerator, lambda: ImageFiles(  # noqa: E731
            self._split(data["dir"], split), img_mode=mode, seed=seed, check_files=check))
        self.train_files = files(data["train_split"])
        self.held_out_files = self.train_files.with_transform(None)  # the same files, not augmented
        self.num_classes = num_classes_of(self.train_files)
        # one seeded order of the training split: [test (if held out)] [validation] [training]
        n = len(self.train_files)
        order = seeded_order(n, data["split_seed"])
        n_test = round(n * data["test_fraction"]) if data["test_split"] is None else 0
        n_val = round(n * data["val_fraction"])
        if data["test_split"] is None and n_test == 0:
            raise ValueError("data.test_split is None: set data.test_fraction > 0 to hold out a test set")
        if n_test + n_val >= n:
            raise ValueError(f"{n} training images cannot give {n_test} test and {n_val} validation images and a rest")
        self.few_held_out = None if not 0 < n_val < MIN_VAL_IMAGES else (
            f"the budgeted thresholds are fitted on {n_val} held-out images (data.val_fraction={data['val_fraction']} "
            f"of {n}), fewer than {MIN_VAL_IMAGES}: they will be noisy; " +
            (f"set data.val_fraction to at least {math.ceil(MIN_VAL_IMAGES / n * 1000) / 1000}"
             if 2 * MIN_VAL_IMAGES <= n else "use more training images"))
        self.train = Subset(self.train_files, order[n_test + n_val:])
        self.val = Subset(self.held_out_files, order[n_test:n_test + n_val]) if n_val else None
        if data["test_split"] is None:
            self.test = Subset(self.held_out_files, order[:n_test])
        else:
            self.test = files(data["test_split"])
            if class_map(self.test) != class_map(self.train_files):
                raise ValueError(f"the class folders of {self.test.root!r} differ from those of {self.train_files.root!r}")

    @staticmethod
    def _split(root: str, split: str) -> str:
        path = os.path.join(root, split)
        return path + ".tar" if not os.path.exists(path) and os.path.isfile(path + ".tar") else path

    def set_transforms(self, config: Dict[str, Any], model: nn.Module) -> dict:
        data = config["data"]
        data_config = resolve_preprocessing(model, {k: data[k] for k in PREPROCESSING}, lambda key: f"data.{key}")
        self.train_files.transform = image_transform(data_config, True, data["transform"], **data["augment"])
        evaluation = image_transform(data_config, False, data["transform"])
        self.held_out_files.transform = evaluation
        if isinstance(self.test, ImageFiles):
            self.test.transform = evaluation
        return data_config


def sized_model_kwargs(config: Dict[str, Any]) -> dict:
    """``model.kwargs`` with the input the data gives: 1 channel for ``img_mode='L'``, and the
    resolution of ``data.input_size`` for a model built for one (timm's ``fixed_input_size``: MSDNet,
    ViT, Swin take ``img_size``), so that one key sets it. A size in ``model.kwargs`` (``img_size``,
    or ``input_size`` of a wrapped backbone) that differs from ``data.input_size`` is refused."""
    name, kwargs, size = config["model"]["name"], dict(config["model"]["kwargs"]), config["data"]["input_size"]
    if config["data"]["img_mode"] == "L":
        kwargs.setdefault("in_chans", 1)
    if size is None:
        return kwargs
    given = {key: kwargs[key] for key in ("img_size", "input_size") if key in kwargs}
    for key, value in given.items():
        if (tuple(value[-2:]) if isinstance(value, (list, tuple)) else (value, value)) != tuple(size[1:]):
            raise ConfigError(f"model.kwargs.{key} is {value!r} but data.input_size is {tuple(size)}: set the "
                              f"resolution once, in data.input_size (a model built for a size follows it), and "
                              f"remove model.kwargs.{key}")
    if not given and getattr(timm.models.get_pretrained_cfg(name), "fixed_input_size", False):
        kwargs["img_size"] = tuple(size[1:])
    return kwargs


def _main_first(accelerator: Accelerator, build: Callable[[], Any]) -> Any:
    """``build()`` on the main process, then on the others: a dataset's file check runs once per
    machine (the others find it remembered); a data error on the main process stops the others quietly."""
    if accelerator.num_processes == 1:
        return build()
    if accelerator.is_main_process:
        try:
            built = build()
        except Exception as e:
            if is_user_error(e):
                broadcast_object_list([False])
            raise
        broadcast_object_list([True])
        return built
    if not broadcast_object_list([None])[0]:
        raise AnotherProcessStopped("the main process refused the data")
    return build()


def _model_kwargs(config: Dict[str, Any], num_classes: int) -> dict:
    kwargs = sized_model_kwargs(config)
    kwargs.setdefault("num_classes", num_classes)
    if kwargs["num_classes"] != num_classes:
        raise ValueError(f"model.kwargs.num_classes is {kwargs['num_classes']} but the data has {num_classes} classes")
    return kwargs


def batch_plan(config: Dict[str, Any], num_processes: int) -> Dict[str, Any]:
    """How a phase's batch is shared: ``data.batch_size`` is the global batch of one step (all
    processes together; an update takes ``train.grad_accum_steps`` steps), so a recipe keeps its
    updates per epoch and learning-rate schedule on any number of processes. Returns the global batch
    of an update, each process's share of a step and the learning rate."""
    batch, steps = config["data"]["batch_size"], config["train"]["grad_accum_steps"]
    if batch % num_processes:
        raise ValueError(f"data.batch_size is the global batch (all processes together): {batch} images do not "
                         f"divide over {num_processes} processes; set data.batch_size to a multiple of "
                         f"{num_processes}, or launch a number of processes that divides {batch}")
    return {"global_batch": batch * steps, "per_process_batch": batch // num_processes, "processes": num_processes,
            "grad_accum_steps": steps, "lr": config["optimizer"].get("lr")}


class RunLog:
    """The run folder's ``log.txt``: what the main process prints (as a ``sys.stdout`` that also writes
    to ``stream``), appended line by line, so a resumed run continues it. Kept in memory until
    :meth:`open` (the run's first checkpoint, or its end): a run that stops before it has files of its
    own, or a refused resume, leaves no log behind and changes none."""

    def __init__(self, path: str, stream: Any):
        self.path, self.stream, self.file, self.pending = path, stream, None, []

    def write(self, text: str) -> int:
        self.stream.write(text)
        if self.file is None:
            self.pending.append(text)
        else:
            self.file.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        if self.file is not None:
            self.file.flush()

    def open(self) -> None:
        """Append what was printed so far to the file, and from now on every line as it is printed."""
        if self.file is None:
            self.file = open(self.path, "a", buffering=1)  # line-buffered: a killed run loses no line
            self.file.write("".join(self.pending))
            self.pending.clear()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def __getattr__(self, name: str) -> Any:  # isatty, encoding, fileno, ...: the stream's
        return getattr(self.stream, name)


def train_phase(
        accelerator: Accelerator,
        config: Dict[str, Any],
        output_dir: str,
        name: str = "train",
        previous: Optional[str] = None,
        resume: bool = False,
        extend: bool = False,
        run_id: Optional[str] = None,
        log: Optional[RunLog] = None,
) -> Dict[str, Any]:
    """Train one phase of a config and evaluate it; returns the evaluation report. ``previous`` is
    the weights file of the phase before, which this phase starts from (IMTA phase II, the phases of a
    phase-wise regime); ``extend``: the checkpoint
    was made with fewer epochs, the run goes on with the schedule of the longer run; ``run_id``: the
    run's identity (``run.json``), recorded in its checkpoints: another run's checkpoint is refused;
    ``log``: the run's log file (the main process's), opened at the phase's first checkpoint."""
    phase = TrainingPhase(accelerator, config, output_dir, name, previous, resume, run_id, log)
    try:
        phase.start(resume, extend)
        if phase.data.few_held_out and accelerator.is_main_process:  # once the run has begun: a failed start says only why
            print(f"warning: {phase.data.few_held_out}", file=sys.stderr)
        for epoch in phase.remaining_epochs():
            phase.train_epoch(epoch)
        return phase.finish()
    finally:
        # the accelerator keeps what it prepared: without this, every phase's DDP model, optimizer and
        # loaders stay alive through the later phases, and a DDP model outliving the process group
        # (destroyed by end_training) can abort gloo at interpreter exit
        del phase
        accelerator.free_memory()
        gc.collect()


class TrainingPhase:
    """The pieces of one phase (data, model, technique, optimizer, loader, scheduler, EMA, mixup) and
    its steps: build (the constructor), :meth:`start` (resume a checkpoint or seed a fresh run),
    :meth:`train_epoch` (ending with :meth:`record_epoch`: the summary row, the validation, the best
    checkpoint), :meth:`finish` (the last checkpoint, the model folder, the evaluation)."""

    def __init__(self, accelerator: Accelerator, config: Dict[str, Any], output_dir: str, name: str = "train",
                 previous: Optional[str] = None, resume: bool = False, run_id: Optional[str] = None,
                 log: Optional[RunLog] = None):
        self.accelerator, self.config, self.output_dir, self.name = accelerator, config, output_dir, name
        self.run_id, self.log = run_id, log
        self.checkpoint_dir = os.path.join(output_dir, "checkpoint")
        self.best_dir = os.path.join(output_dir, "best")
        _check_files(output_dir, PHASE_FILES)
        # the position, and what the epochs so far measured: the running sum of this epoch's losses, a
        # summary.csv row per epoch and the best value of train.best_metric (None: none yet)
        self.state: Dict[str, Any] = {"epoch": 0, "batch": 0, "updates": 0, "finished": False, "loss_sum": 0.0,
                                      "summary": [], "best": None}
        train_cfg, dc = config["train"], config["data"]
        for folder in (self.checkpoint_dir, self.best_dir):
            if accelerator.is_main_process and (restored := recover_folder(folder)):
                accelerator.print(f"[{name}] {restored}")
        accelerator.wait_for_everyone()
        if os.path.isdir(self.checkpoint_dir) and not resume:
            raise FileExistsError(f"{self.checkpoint_dir!r} exists: pass --resume to continue that run, or choose "
                                  f"another --output-dir")

        self.data = data = _Data(config, accelerator)
        self.classes = class_names(data.train_files)
        self.technique = create_technique(**config["technique"], seed=train_cfg["seed"])
        if isinstance(self.technique, HDKD) and data.val is None:
            raise ValueError("loss='hdkd' learns its weights on a held-out split: set data.val_fraction > 0")
        if isinstance(self.technique, L2W) and train_cfg["grad_accum_steps"] > 1:
            raise ValueError("loss='l2w' takes an optimizer step after each half of a batch: it does not accumulate "
                             "gradients (set train.grad_accum_steps=1)")
        set_seed(train_cfg["seed"])  # the same initial weights on every process
        model = create_training_model(config["model"]["name"], self.technique,
                                      _model_kwargs(config, data.num_classes), previous)
        self.data_config = data.set_transforms(config, model)
        self.model = model = self.technique.prepare(model.to(accelerator.device))
        num_exits = model.num_exits if is_multi_exit(model) else 1
        self.columns = [*SUMMARY_COLUMNS, *(f"exit{k}_top1" for k in range(1, num_exits + 1)), "anytime_top1"]
        if train_cfg["best_metric"] not in self.columns:
            raise ConfigError(f"train.best_metric {train_cfg['best_metric']!r} names an exit {model.__class__.__name__} "
                              f"does not have: it has {num_exits} exits (exit1_top1 to exit{num_exits}_top1)")
        if accelerator.is_main_process:  # a checkpoint (weights, optimizer state, the previous one aside) and the weights
            check_writable(output_dir, 8 * sum(p.numel() * p.element_size() for p in model.parameters()) + 2 ** 26)
        optimizer = create_optimizer_v2(model, **config["optimizer"])
        sampler = EpochSampler(len(data.train), train_cfg["seed"])
        plan = batch_plan(config, accelerator.num_processes)
        if len(data.train) < dc["batch_size"]:
            raise ValueError(f"{len(data.train)} training images make no batch of {dc['batch_size']}")
        # each process loads its share of every global batch (accelerate deals the loader's batches out
        # in turn); the loader's own generator: an iterator must not draw from the global RNG (dropout's)
        train_loader = DataLoader(data.train, batch_size=plan["per_process_batch"], sampler=sampler, drop_last=True,
                                  num_workers=loader_workers(dc["workers"]),
                                  generator=torch.Generator().manual_seed(train_cfg["seed"]))
        self.forward, self.optimizer, self.train_loader = accelerator.prepare(TrainingForward(model), optimizer,
                                                                              train_loader)
        updates_per_epoch = math.ceil(len(self.train_loader) / accelerator.gradient_accumulation_steps)
        accelerator.print(f"[{name}] global batch {plan['global_batch']} ({plan['per_process_batch']} per process x "
                          f"{plan['processes']} processes x {plan['grad_accum_steps']} accumulation steps), "
                          f"{updates_per_epoch} updates per epoch, lr {plan['lr']}")
        self.scheduler, self.epochs = create_scheduler_v2(self.optimizer, num_epochs=train_cfg["epochs"],
                                                          updates_per_epoch=updates_per_epoch, **config["scheduler"])
        self.ema = ModelEmaV3(model, decay=train_cfg["ema_decay"]) if train_cfg["ema_decay"] else None
        mixup = config["mixup"]
        self.mixup = Mixup(**mixup, label_smoothing=config["technique"]["label_smoothing"],
                           num_classes=data.num_classes) if mixup["mixup_alpha"] > 0 or mixup["cutmix_alpha"] > 0 else None
        self.val_loader = None
        if train_cfg["val_interval"] and data.val is None:
            accelerator.print(f"[{name}] no validation split (data.val_fraction is 0): summary.csv records the "
                              f"training loss only and no best checkpoint is kept")
        elif train_cfg["val_interval"]:
            self.val_loader = _eval_loader(accelerator, data.val, dc)

    def start(self, resume: bool = False, extend: bool = False) -> None:
        """Continue from the phase's checkpoint (``resume``, if there is one: weights, optimizer,
        scheduler unless ``extend``, RNG states, the technique's state, EMA), else seed a fresh run."""
        acc, train_cfg = self.accelerator, self.config["train"]
        self.started = time.time()
        if not (resume and os.path.isdir(self.checkpoint_dir)):
            set_seed(train_cfg["seed"], device_specific=True)  # dropout and mixup differ between processes
            return
        # a longer run has its own schedule: timm's schedulers are functions of the epoch and step,
        # their saved state is their length (an extended run must not restore it)
        saved = load_checkpoint(self.checkpoint_dir, self.model, self.optimizer, None if extend else self.scheduler,
                                self.config["model"]["name"], restore_rng=False, run_id=self.run_id)
        self.state = self._checked_state(saved, extend)
        if extend and self.state["epoch"] < self.epochs:
            self.state["finished"] = False
        training = training_state(self.checkpoint_dir)
        try:
            rngs = training["rng_per_process"]
            set_rng_state(rngs[acc.process_index] if len(rngs) == acc.num_processes else rngs[0])
            self.technique.load_state_dict(training)
            if self.ema is not None:
                self.ema.load_state_dict(training["ema"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise ValueError(f"{os.path.join(self.checkpoint_dir, 'training.pt')!r} does not fit this run "
                             f"({type(e).__name__}: {e}): resume with the config it was made with, or remove "
                             f"{self.checkpoint_dir!r} to start afresh") from None
        acc.print(f"[{self.name}] resumed from {self.checkpoint_dir}: epoch {self.state['epoch'] + 1}, batch "
                  f"{self.state['batch']}" + (f" (extended to {self.epochs} epochs)" if extend else ""))

    def _checked_state(self, saved: Dict[str, Any], extend: bool) -> Dict[str, Any]:
        """The position of a checkpoint's ``state.json`` (epoch, batch, updates, finished), each value
        checked against this run (``extend``: a finished run made longer), and its classes against
        the data's."""
        path = os.path.join(self.checkpoint_dir, "state.json")
        batches = len(self.train_loader)
        limits = {"epoch": self.epochs, "batch": batches - 1, "updates": self.epochs * batches}
        state = {k: saved.get(k) for k in self.state}
        for key, top in limits.items():
            if type(state[key]) is not int or not 0 <= state[key] <= top:
                raise ValueError(f"{path!r}: {key} is {state[key]!r}, expected an integer from 0 to {top} for this "
                                 f"run; the checkpoint is damaged: remove {self.checkpoint_dir!r} to start afresh")
        if type(state["finished"]) is not bool or (state["epoch"] == self.epochs and state["batch"]) or (
                state["finished"] and state["epoch"] < self.epochs and not extend):
            raise ValueError(f"{path!r}: finished is {state['finished']!r} at epoch {state['epoch']}, batch "
                             f"{state['batch']}; the checkpoint is damaged: remove {self.checkpoint_dir!r} to start "
                             f"afresh")
        if saved.get("phase", self.name) != self.name:
            raise ValueError(f"{self.checkpoint_dir!r} is the checkpoint of phase {saved['phase']!r}, not of "
                             f"{self.name!r}: it was copied here; remove it to start this phase afresh")
        classes = saved.get("classes", self.classes)
        if classes != self.classes:
            raise ValueError(f"the classes of {self.data.train_files.root!r} are not those the run was trained on: "
                             f"{_class_difference(classes, self.classes)}. Resume with the data the run was "
                             f"trained on (data.dir may move, its classes may not), or start a new run")
        measured = {k: saved.get(k, self.state[k]) for k in ("loss_sum", "summary", "best")}  # an older version's: none
        rows, best = measured["summary"], measured["best"]
        number = lambda v: type(v) in (int, float) and math.isfinite(v)  # noqa: E731
        if not (number(measured["loss_sum"]) and isinstance(rows, list)
                and (len(rows) == state["epoch"] or "summary" not in saved)
                and all(isinstance(r, dict) and list(r) == self.columns and all(v is None or number(v) for v in r.values())
                        for r in rows)
                and (best is None or isinstance(best, dict) and best.get("metric") == self.config["train"]["best_metric"]
                     and number(best.get("value")) and type(best.get("epoch")) is int)):
            raise ValueError(f"{path!r}: its loss_sum, summary or best is not what this run records at epoch "
                             f"{state['epoch']} ({len(self.columns)} summary columns: {', '.join(self.columns)}); the "
                             f"checkpoint is damaged: remove {self.checkpoint_dir!r} to start afresh")
        return {**state, **measured}

    def remaining_epochs(self) -> range:
        return range(self.state["epoch"] if not self.state["finished"] else self.epochs, self.epochs)

    def train_epoch(self, epoch: int) -> None:
        """The epoch's batches from the saved position (a checkpoint every ``train.checkpoint_every``
        updates), then the end-of-epoch checkpoint."""
        acc, state, train_cfg = self.accelerator, self.state, self.config["train"]
        self.technique.set_epoch(epoch, self.epochs)  # per-epoch loss weights (SDN's warm-up)
        self.scheduler.step(epoch)
        self.scheduler.step_update(state["updates"])  # a no-op unless the schedule steps per update
        self.data.train_files.set_epoch(epoch)
        loader = acc.skip_first_batches(self.train_loader, state["batch"]) if state["batch"] else self.train_loader
        loader.set_epoch(epoch)
        bar = tqdm(loader, desc=f"[{self.name}] epoch {epoch + 1}/{self.epochs}", initial=state["batch"],
                   total=len(self.train_loader), disable=not acc.is_local_main_process)
        for images, target in bar:
            if self.mixup is not None:
                images, target = self.mixup(images, target)
            losses = self.step(images, target)
            state["loss_sum"] += losses["loss"]
            state["batch"] += 1
            if not acc.sync_gradients:
                continue
            state["updates"] += 1
            self.scheduler.step_update(state["updates"])
            if self.ema is not None:
                self.ema.update(self.model, step=state["updates"])
            lr = self.optimizer.param_groups[0]["lr"]
            if train_cfg["log_every"] and state["updates"] % train_cfg["log_every"] == 0:
                acc.log({f"{self.name}/{k}": v for k, v in losses.items()} | {f"{self.name}/lr": lr},
                        step=state["updates"])
            bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{lr:.3g}")
            every = train_cfg["checkpoint_every"]
            if every and state["updates"] % every == 0 and state["batch"] < len(self.train_loader):
                self.save()
                acc.print(f"[{self.name}] checkpoint: epoch {epoch + 1}, batch {state['batch']}, "
                          f"{state['updates']} updates", flush=True)
        self.record_epoch(epoch + 1)
        state.update(epoch=epoch + 1, batch=0, loss_sum=0.0)
        self.save()

    def record_epoch(self, epoch: int) -> None:
        """The end of ``epoch`` (1-based): its ``summary.csv`` row (the mean loss of its batches, the
        learning rate, and every ``train.val_interval`` epochs and after the last the validation), logged
        to the tracker and printed, and the best checkpoint kept (before the epoch's checkpoint records
        them: a run killed in between repeats the epoch and its row)."""
        acc, interval = self.accelerator, self.config["train"]["val_interval"]
        groups = self.optimizer.param_groups
        row = dict.fromkeys(self.columns)
        row.update(epoch=epoch, train_loss=self.state["loss_sum"] / len(self.train_loader),
                   lr=sum(g["lr"] for g in groups) / len(groups))  # timm's summary: the mean over param groups
        if self.val_loader is not None and (epoch % interval == 0 or epoch == self.epochs):
            measured = self.validate()
            row.update(measured)
            acc.log({f"{self.name}/val/{k}": v for k, v in measured.items()}, step=self.state["updates"])
        acc.print(f"[{self.name}] epoch {epoch}/{self.epochs}: " +
                  ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch" and v is not None), flush=True)
        self.keep_best(row)
        self.state["summary"].append(row)
        if acc.is_main_process:
            with atomic_file(os.path.join(self.output_dir, SUMMARY_FILE)) as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, self.columns)
                writer.writeheader()
                writer.writerows(self.state["summary"])

    def validate(self) -> Dict[str, float]:
        """Accuracy (%) on the held-out split, every process's samples, of the weights evaluated at the
        end (the EMA's if any): timm's eval columns for the last exit (what ``model(x)`` answers), every
        exit's top-1 and their mean (the anytime accuracy)."""
        acc = self.accelerator
        outputs = collect_outputs(self.evaluated, self.val_loader, acc.device, acc.gather_for_metrics,
                                  progress=acc.is_local_main_process)
        self.model.train()  # back from eval mode (a regime keeps its frozen parts in eval mode)
        top = anytime_accuracy(outputs)
        return {"eval_loss": nn.functional.cross_entropy(outputs.logits[-1], outputs.labels).item(),
                "eval_top1": top["top1"][-1], "eval_top5": top["top5"][-1],
                **{f"exit{k}_top1": v for k, v in enumerate(top["top1"], 1)},
                "anytime_top1": sum(top["top1"]) / len(top["top1"])}

    @property
    def evaluated(self) -> nn.Module:
        """The weights evaluated and kept: the EMA's if any, else the model's."""
        return self.ema.module if self.ema is not None else self.model

    def keep_best(self, row: Dict[str, Any]) -> None:
        """Save the evaluated weights to ``best/`` (with the metric, its value and the epoch) if the
        row's ``train.best_metric`` was measured and beats the best so far (higher; eval_loss: lower),
        as timm's CheckpointSaver keeps ``model_best``."""
        metric, best = self.config["train"]["best_metric"], self.state["best"]
        value = row[metric]
        if value is None or best is not None and not (value < best["value"] if metric == "eval_loss" else
                                                      value > best["value"]):
            return  # not validated this epoch, or not better
        self.state["best"] = {"metric": metric, "value": value, "epoch": row["epoch"]}
        if self.accelerator.is_main_process:
            save_checkpoint(self.best_dir, self.evaluated, model_name=self.config["model"]["name"], phase=self.name,
                            run_id=self.run_id, classes=self.classes, **self.state["best"])
        self.accelerator.print(f"[{self.name}] best {metric} so far ({value:.4g}): epoch {row['epoch']}, saved to "
                               f"{self.best_dir}")

    def step(self, images: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
        """One batch of the technique: forward, losses, backward and (on update steps) the optimizer
        step; returns the losses averaged over processes, and stops on a non-finite loss."""
        acc, technique, updates = self.accelerator, self.technique, self.state["updates"]
        with acc.accumulate(self.forward):
            if isinstance(technique, HDKD) and acc.sync_gradients and technique.due(updates):
                technique.update_weights(self.model, (images, target), self._val_batch(updates, len(images)),
                                         self.optimizer.param_groups[0]["lr"])
            if isinstance(technique, PCGrad):
                with acc.no_sync(self.forward):  # PCGrad averages the processes' gradients itself
                    terms = technique.batch_losses(self.model, self.forward, images, target)
                technique.backward(terms, self.model.parameters(), scale=1.0 / acc.gradient_accumulation_steps)
            elif isinstance(technique, L2W):  # two updates per batch: the first half's is taken inside
                terms = technique.step(self.model, self.forward, images, target, backward=acc.backward,
                                       optimizer=self.optimizer, update=self._update, index=self.state["batch"])
            else:
                terms = technique.step(self.model, self.forward, images, target, backward=acc.backward)
            values = self._update(terms)
        losses = dict(zip(terms, values.tolist()))
        return {"loss": sum(losses.values()), **losses}

    def _update(self, terms: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Stop on a non-finite loss, clip, step the optimizer and zero the gradients; returns the
        loss terms averaged over the processes."""
        acc = self.accelerator
        values = acc.reduce(torch.stack([v.detach().float() for v in terms.values()]), "mean")
        if not torch.isfinite(values).all():
            raise FloatingPointError(f"the loss is not finite ({dict(zip(terms, values.tolist()))}); training "
                                     f"stopped before the optimizer step, the last checkpoint is the last good "
                                     f"state: lower optimizer.lr or set train.clip_grad")
        if acc.sync_gradients and self.config["train"]["clip_grad"]:
            acc.clip_grad_norm_(self.model.parameters(), self.config["train"]["clip_grad"])
        self.optimizer.step()
        self.optimizer.zero_grad()
        return values

    def _val_batch(self, updates: int, size: int):
        """A batch of the held-out split drawn from (seed, update, process): the same after a resume."""
        seed = (self.config["train"]["seed"] * 1_000_003 + updates) * 101 + self.accelerator.process_index
        index = torch.randperm(len(self.data.val), generator=torch.Generator().manual_seed(seed))[:size]
        images, target = zip(*(self.data.val[i] for i in index.tolist()))
        device = self.accelerator.device
        return torch.stack(images).to(device), torch.tensor(target, device=device)

    def save(self, **extra) -> None:
        """An atomic checkpoint of the phase (every process's RNG state, the technique's state, EMA)."""
        training = {"rng_per_process": gather_object([rng_state()]), **self.technique.state_dict()}
        if self.ema is not None:
            training["ema"] = self.ema.state_dict()
        if self.accelerator.is_main_process:
            save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.scheduler,
                            self.config["model"]["name"], training, phase=self.name, run_id=self.run_id,
                            classes=self.classes, **self.state, **extra)
            if self.log is not None:  # the run has files of its own now: its log goes on in log.txt
                self.log.open()
        self.accelerator.wait_for_everyone()

    def finish(self) -> Dict[str, Any]:
        """The finished checkpoint (once), the model folder (EMA weights if any) and the evaluation."""
        if not self.state["finished"]:
            self.state["finished"] = True
            self.save(seconds=round(time.time() - self.started, 1))
        acc, config, evaluated = self.accelerator, self.config, self.evaluated
        if acc.is_main_process:  # a timm model folder: model.safetensors and config.json
            save_model_folder(evaluated, self.output_dir, self.data_config, self.classes,
                              technique=config["technique"], phase=self.name, config=config)
        report = _evaluate(acc, evaluated, self.data, self.data_config, config, self.name, self.output_dir)
        acc.log({f"{self.name}/exit{e['exit']}_top1": e["top1"] for e in report["exits"]}, step=self.state["updates"])
        acc.wait_for_everyone()
        return report


def _eval_loader(accelerator: Accelerator, dataset: Dataset, dc: Dict[str, Any]) -> DataLoader:
    """A prepared loader of a held-out split, each process a share (its own generator: iterating it
    never draws from the global RNG, so evaluating leaves training as it was)."""
    return accelerator.prepare(DataLoader(dataset, batch_size=dc["eval_batch_size"],
                                          num_workers=loader_workers(dc["workers"]), generator=torch.Generator()))


def _evaluate(accelerator: Accelerator, model: nn.Module, data: _Data, data_config: dict, config: Dict[str, Any],
              name: str, output_dir: str) -> Dict[str, Any]:
    ev, dc = config["evaluation"], config["data"]

    def outputs(dataset):
        if dataset is None:
            return None
        return collect_outputs(model, _eval_loader(accelerator, dataset, dc), accelerator.device,
                               accelerator.gather_for_metrics, progress=accelerator.is_local_main_process)

    val, test = outputs(data.val), outputs(data.test)
    costs = [c.macs for c in profiling.profile_exits(model, data_config["input_size"], ev["convention"])]
    q_grid = Q_GRIDS[ev["q_grid"]]
    report = evaluation_report(val, test, costs, ev["policy"], q_grid, model=config["model"]["name"], phase=name,
                               data_dir=dc["dir"], test_split=dc["test_split"], convention=ev["convention"],
                               epochs=config["train"]["epochs"], technique=config["technique"])
    if accelerator.is_main_process:
        accelerator.print(f"\n[{name}] {config['model']['name']}: {test.num_samples} test images\n{format_report(report)}")
        paths = write_report(report, output_dir, label=f"{config['model']['name']} ({name})",
                             cost_label=f"M{ev['convention']} per image")
        accelerator.print(f"[{name}] wrote {paths['json']}, {paths['png']} and {os.path.join(output_dir, 'model.safetensors')}")
    return report


def run(config: Dict[str, Any], resume: bool = False, extend_epochs: bool = False) -> List[Dict[str, Any]]:
    """Every phase of a resolved config (see :func:`timm_exits.config.load_config`), in order;
    returns their evaluation reports. ``resume`` continues the run in ``config['output_dir']``
    (refusing a changed config, see :func:`resume_changes`; ``extend_epochs`` allows more epochs);
    without it, a folder that holds a run is kept and this run writes to ``<output_dir>-1`` (-2, ...)."""
    runs = phase_configs(config)
    for _, phase in runs:
        check_factories(phase)
    train_cfg = config["train"]
    find_unused = any(c["technique"]["loss"] == "adn" for _, c in runs)  # the base-net skips blocks
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
                lock, extended, run_id = _claim_output_dir(accelerator, config, resume, extend_epochs)
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
        started = lock is None or _saved_checkpoint(lock)
        raise
    finally:
        logging.close()
        accelerator.end_training()  # also destroys the process group of a multi-process run
        if lock is not None:
            lock.release() if started else lock.abandon()


RUN_FILE = "run.json"  # the resolved config, the process count and the identity of the run in a folder
LOG_FILE = "log.txt"  # every line the run printed, in the run folder
RUN_FILES = (RUN_FILE, "results.json", LOG_FILE)  # the files of a run folder, and of each phase's folder
SUMMARY_FILE = "summary.csv"  # a row per epoch, in each phase's folder
SUMMARY_COLUMNS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr")  # timm's; then per exit
PHASE_FILES = (WEIGHTS_FILE, CONFIG_FILE, "evaluation.json", "evaluation.png", SUMMARY_FILE)
SAFE_TO_CHANGE = ("data.dir", "data.workers", "data.eval_batch_size", "train.log_every", "train.checkpoint_every",
                  "tracker", "output_dir", "evaluation.policy", "evaluation.q_grid", "evaluation.convention")


def check_factories(config: Dict[str, Any]) -> None:
    """Build the model (on the meta device: no memory, no weights), optimizer and scheduler of a
    phase before any data is read, so a misspelt name or argument is an error at once."""
    name = config["model"]["name"]
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ConfigError(f"model.name {name!r} is not a timm model" +
                          (f" (did you mean {' or '.join(map(repr, close))}?)" if close else
                           "; see `timm-exits models` or timm.list_models()"))
    steps = (("model.kwargs", lambda _: timm.create_model(name, **config["model"]["kwargs"])),
             ("optimizer", lambda model: create_optimizer_v2(model, **config["optimizer"])),
             ("scheduler", lambda optimizer: create_scheduler_v2(optimizer, num_epochs=config["train"]["epochs"],
                                                                 updates_per_epoch=1, **config["scheduler"])))
    built = None
    with torch.device("meta"):
        for section, build in steps:
            try:
                built = build(built)
            except (TypeError, ValueError, KeyError, AssertionError) as e:
                raise ConfigError(f"{section} {config[section] if section != 'model.kwargs' else config['model']['kwargs']!r} "
                                  f"does not work for {name}: {e}") from None
    _check_input_size(name, sized_model_kwargs(config), config["data"]["input_size"])


def _resized(kwargs: dict, side: int) -> dict:
    """``kwargs`` with a size the model is built for (``img_size``, ``input_size``) set to ``side`` x ``side``."""
    sizes = {"img_size": (side, side), "input_size": (kwargs.get("input_size") or (0,))[:1] + (side, side)}
    return {**kwargs, **{key: sizes[key] for key in sizes if key in kwargs}}


def _fails_on(name: str, kwargs: dict, shape: Sequence[int]) -> Optional[str]:
    """Why ``name`` built with ``kwargs`` on the meta device does not run on one image of ``shape``
    (the first line of the error), or None if it does."""
    try:
        with torch.device("meta"):
            timm.create_model(name, **kwargs).eval()(torch.empty(1, *shape))
    except (RuntimeError, ValueError, AssertionError, TypeError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def _check_input_size(name: str, kwargs: dict, size: Optional[Sequence[int]]) -> None:
    """Build the model for ``data.input_size`` on the meta device and run it once on a dummy image of
    that shape, before any data is read. A size it does not take is refused with the smallest square
    size it takes (found by bisection up to its default size: the sizes a model takes form a range)
    and, for smaller images, the models of its family made for them (msdnet_cifar_* for MSDNet)."""
    if size is None or (problem := _fails_on(name, kwargs, size)) is None:
        return
    default = getattr(timm.models.get_pretrained_cfg(name), "input_size", None) or (size[0], 224, 224)
    low, high = 1, default[-1]
    if _fails_on(name, _resized(kwargs, high), (size[0], high, high)):
        return  # it does not run on the meta device at all: the first batch tells
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if _fails_on(name, _resized(kwargs, middle), (size[0], middle, middle)) is None \
            else (middle + 1, high)
    default_side = lambda model: max((getattr(timm.models.get_pretrained_cfg(model), "input_size", None)  # noqa: E731
                                      or (0, math.inf))[1:])
    family = [m for m in timm.list_models(name.split("_")[0] + "_*") if default_side(m) <= max(size[1:])]
    raise ConfigError(f"{name} does not run on data.input_size {tuple(size)} ({problem}): the smallest input it takes "
                      f"is {low}x{low} pixels (its default: {default[-2]}x{default[-1]}); resize the images to that "
                      f"(data.input_size)" + (f", or for images this small take a model made for them: "
                                              f"{', '.join(family)}" if family else ""))


def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def resume_changes(saved: Dict[str, Any], config: Dict[str, Any]) -> Dict[str, List[str]]:
    """What differs between a run's saved config and the config it is resumed with, per phase
    (``{phase: ["key: old -> new", ...]}``), leaving out :data:`SAFE_TO_CHANGE`."""
    normal = lambda c: json.loads(json.dumps(c, default=str))  # noqa: E731  (tuples as lists, as saved)
    old, new = dict(phase_configs(normal(saved))), dict(phase_configs(normal(config)))
    if list(old) != list(new):
        return {"phases": [f"names: {list(old)} -> {list(new)}"]}
    changes = {}
    for name in old:
        a, b = _flat(old[name]), _flat(new[name])
        differ = [k for k in sorted(a.keys() | b.keys()) if a.get(k, "<unset>") != b.get(k, "<unset>")
                  and k not in SAFE_TO_CHANGE]
        if differ:
            changes[name] = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in differ]
    return changes


def _check_files(folder: str, names: tuple) -> None:
    """Refuse a run folder where something other than a file sits in the place of one of its files."""
    for name in names:
        path = os.path.join(folder, name)
        if os.path.lexists(path) and (os.path.islink(path) or not os.path.isfile(path)):
            raise FileExistsError(f"{path!r} is not a file; the run writes its {name} there: move it away, or "
                                  f"choose another --output-dir")


def _class_difference(old: List[str], new: List[str]) -> str:
    """What differs between the class names a run was trained on and those of the data (in a sentence)."""
    if sorted(old) == sorted(new):
        moved = [f"{a!r} -> {b!r}" for a, b in zip(old, new) if a != b]
        return f"the same {len(old)} names in another order (index by index: {', '.join(moved[:5])})"
    gone, added = [c for c in old if c not in new], [c for c in new if c not in old]
    return f"trained on {len(old)} classes, the data has {len(new)}; missing: {gone[:5]}, not trained on: {added[:5]}"


def _read_run_file(path: str) -> Dict[str, Any]:
    """A run folder's ``run.json``, checked to be one this package wrote."""
    try:
        saved = read_json(path)
    except (OSError, ValueError) as e:
        problem = f"cannot be read as JSON ({e})"
    else:
        processes = saved.get("processes") if isinstance(saved, dict) else None
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
            problem = "is not a timm-exits run record (expected a mapping with the run's 'config')"
        elif type(processes) is not int or processes < 1:
            problem = f"records {processes!r} processes, expected an integer >= 1"
        elif not isinstance(saved.get("run_id", ""), str):
            problem = f"records run_id {saved['run_id']!r}, expected a string"
        else:
            return saved
    raise ValueError(f"{path!r} {problem}: the run's record is damaged; restore it from a copy, or start a new run in "
                     f"another --output-dir")


def _saved_checkpoint(lock: OutputLock) -> bool:
    """Whether the run in the locked folder saved a checkpoint since it locked it (its own, or a phase's)."""
    added = set(os.listdir(lock.folder)) - lock.found
    return any(os.path.isdir(os.path.join(lock.folder, name, "checkpoint")) for name in added) or \
        "checkpoint" in added


def _holds_run(folder: str) -> bool:
    return os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, f)) for f in (RUN_FILE, "results.json",
                                                                                             "checkpoint"))


def _claim_output_dir(accelerator: Accelerator, config: Dict[str, Any], resume: bool, extend_epochs: bool):
    """Lock the run's output folder (the main process, for the whole run) and check a resumed run's
    config; returns the lock, the phases whose epochs are extended and the run's identity."""
    wanted = config["output_dir"]
    batches = {name: batch_plan(phase, accelerator.num_processes) for name, phase in phase_configs(config)}
    if resume:  # the run in that folder, or an error if another process has it
        lock = OutputLock(wanted, check_writable(wanted))
    else:
        lock = claim_fresh_folder(wanted, _holds_run)
    candidate = lock.folder
    if candidate != wanted:
        accelerator.print(f"{wanted} holds another run (--resume continues it); this run writes to {candidate}")
    _check_files(candidate, RUN_FILES)
    run_file, extended = os.path.join(candidate, RUN_FILE), []
    record = {"config": config, "processes": accelerator.num_processes, "batches": batches,
              "run_id": uuid.uuid4().hex}
    if resume and os.path.isfile(run_file):
        saved = _read_run_file(run_file)
        record["run_id"] = saved.get("run_id", record["run_id"])  # a run of an older version has none
        if saved["processes"] != accelerator.num_processes:
            raise ValueError(f"the run in {candidate} used {saved['processes']} processes, this one has "
                             f"{accelerator.num_processes}: resume it with the same number (accelerate launch "
                             f"--num_processes {saved['processes']}), or start a new run")
        changes = resume_changes(saved["config"], config)
        extended = _extensions(changes, saved["config"], config, candidate) if extend_epochs else []
        changes = {phase: c for phase, c in changes.items() if phase not in extended}
        if changes:
            listed = "; ".join(f"phase {phase!r}: {', '.join(c)}" for phase, c in changes.items())
            raise ValueError(f"--resume: the config differs from the one the run in {candidate} was started with "
                             f"({listed}). Resume with the same config (only {', '.join(SAFE_TO_CHANGE)} may "
                             f"change; more train.epochs with --extend-epochs), or start a new run")
    elif resume and _holds_run(candidate):
        accelerator.print(f"--resume: {candidate} has no {RUN_FILE} (a run of an older version): its config cannot "
                          f"be checked; resuming with this one")
    elif resume:
        accelerator.print(f"--resume: {candidate} holds no run to continue; starting a fresh run")
    write_json(run_file, record, default=str)
    return lock, extended, record["run_id"]


def _extensions(changes: Dict[str, List[str]], saved: Dict[str, Any], config: Dict[str, Any], folder: str) -> List[str]:
    """The phases whose only change is more ``train.epochs`` (checked: no later phase has started
    from their weights yet)."""
    old, new = dict(phase_configs(saved)), dict(phase_configs(config))
    names, extended = list(new), []
    for name, change in changes.items():
        if any(not c.startswith("train.epochs:") for c in change) or new[name]["train"]["epochs"] < old[name]["train"]["epochs"]:
            continue
        later = [n for n in names[names.index(name) + 1:] if os.path.isdir(os.path.join(folder, n, "checkpoint"))]
        if later:
            raise ValueError(f"--extend-epochs: phase {name!r} cannot train longer, phase {later[0]!r} already started "
                             f"from its weights; extend the last phase only, or start a new run")
        extended.append(name)
    return extended




def main(default_config: Optional[str] = None, argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """Command line of the recipes: ``CONFIG [--data-dir] [--output-dir] [--resume [--extend-epochs]]
    [--cfg-options k=v ...]``. A user mistake prints ``error: ...`` and returns 2."""
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
