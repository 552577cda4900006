"""The run's configuration: flag values from a config file (a run's config.json, or YAML), checked as the
command line would check them, and `Settings`, what a run derives from its flags (model size, task, precision,
workers), recorded as config.json's `resolved` part."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

import dataset as data
from maskcls import faces, loaders
from maskcls.cli import UsageError, optional_bool, str2bool
from maskcls.distributed import log
from maskcls.hub import PretrainedUnavailable
from maskcls.runtime import default_amp, default_reuse_memory, slow_amp_warning
from maskcls.task import Task, get_task
from model import check_pretrained, model_info, regularization_options, size_options
# Imported where used, being heavy or optional: yaml (only a YAML --config).


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """Flag values from a JSON or YAML file (a run's config.json holds them plus a `resolved` part)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config file not found: {file}")
    text = file.read_text()
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as e:
        raise UsageError(f"cannot parse --config ({e.__class__.__name__}: {str(e).splitlines()[0][:100]}): {file}") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config must hold a mapping of flag names to values: {file}")
    if values.get("resume") and file.name != "config.json":  # a run's config.json always records its resume
        print(f"warning: --config {file}: its resume key is ignored (a config starts a run); continue a run "
              f"with --resume on the command line", file=sys.stderr)
    values = {k: v for k, v in values.items() if k not in ("resolved", "config", "resume")}
    actions = {a.dest: a for a in parser._actions}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise UsageError(f"--config has unknown keys {', '.join(unknown)}: {file}")
    return {key: config_value(actions[key], value, file) for key, value in values.items()}


def config_value(action: argparse.Action, value: object, file: Path) -> object:
    """A config file's value as the flag would parse it: argparse applies neither `type`, `nargs` nor
    `choices` to defaults, so without this `epochs: 1.5` or `scheduler: cosin` would reach the run."""
    def fail(why: str) -> NoReturn:
        raise UsageError(f"--config {action.dest}: {why}: {file}")

    def convert(item: object) -> object:
        if isinstance(item, (list, dict)):
            fail(f"expected one value, got {item!r}")
        if action.type is None:
            converted = item if isinstance(item, str) else str(item)
        elif isinstance(item, bool) and action.type not in (str2bool, optional_bool):
            fail(f"expected a number, got {item!r}")  # int(True) would pass as 1
        else:
            try:  # as on the command line: 16.0 is not an int, "2e-3" (YAML 1.1 reads it as text) is a float
                converted = item if isinstance(item, bool) else action.type(str(item))
            except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
                kind = getattr(action.type, "__name__", "")
                fail(f"expected {'an' if kind == 'int' else 'a'} {kind}, got {item!r}" if kind in ("int", "float")
                     else str(e))
        if action.choices is not None and converted not in action.choices:
            fail(f"unknown value {converted!r} (known: {', '.join(map(str, action.choices))})")
        return converted

    if value is None:
        if action.default is None:
            return None
        fail(f"needs a value (default {action.default!r})")
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        if not isinstance(value, list) or (action.nargs == "+" and not value):
            form = ", ".join(str(action.metavar or "...").split())
            fail(f"expected a list [{form}] as {action.option_strings[0]} takes, got {value!r}")
        return [convert(item) for item in value]
    return convert(value)


@dataclass
class Settings:
    """What the run derived from its arguments (kept apart from them in config.json)."""

    task: Task
    resize: tuple[int, int]
    age_bins: tuple[int, int]
    score_age_bins: tuple[int, int]
    amp: bool
    channels_last: bool
    reuse_memory: bool
    num_workers: int
    model_options: dict
    data_dir: str
    world: int
    global_batch: int
    mean: tuple = ()
    std: tuple = ()
    run_dir: str | None = None
    face: dict | None = None  # the face stage's settings (faces.FaceSettings), before training learns its fallback

    def to_dict(self) -> dict:
        out = {k: v for k, v in vars(self).items() if k != "task"}
        out.update(task=self.task.name, age_head=self.task.age_head, age_sigma=self.task.age_sigma, world_size=self.world)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items() if k != "world"}


def resolve_settings(args: argparse.Namespace, device: torch.device, world: int, demo_dir: str) -> Settings:
    """Defaults that depend on the model, the task or the hardware; unknown names fail here. `demo_dir`: the
    training data when no --data_dir is given."""
    try:
        spec = data.dataset_spec(args.dataset)
        augmentation = data.create_augmentation(args.augmentation)
        info = model_info(args.model)
        resize = tuple(args.resize or info.input_size)
        model_options = {**size_options(args.model, resize),
                         **regularization_options(args.model, args.dropout, args.drop_path, args.freeze_blocks)}
        task = get_task(args.task or spec["task"], args.age_head, args.age_sigma)
        if args.pretrained and not args.resume:
            check_pretrained(args.model)  # offline without cached weights: fail now, not after data setup
    except (ValueError, PretrainedUnavailable) as e:
        raise UsageError(str(e)) from None
    if augmentation.crop and min(augmentation.crop[1:]) < 1:  # (mode, height, width)
        raise UsageError(f"--augmentation {args.augmentation} has an empty crop")
    if augmentation.crop and args.face_crop != "none":
        raise UsageError(f"--face_crop {args.face_crop} cuts the face from the photo, --augmentation {args.augmentation} "
                         f"crops the photo's frame ({augmentation.crop[0]} {augmentation.crop[1]}x{augmentation.crop[2]}): "
                         f"choose one (e.g. --augmentation FastAugmentation)")
    age_bins = tuple(args.age_bins)
    if args.amp and (note := slow_amp_warning(device)):
        log(f"warning: --amp True: {note}")
    workers = args.num_workers if args.num_workers is not None else \
        loaders.default_num_workers(cpu_training=device.type == "cpu", cached=args.cache)
    return Settings(task=task, resize=resize, age_bins=age_bins, score_age_bins=tuple(args.score_age_bins or age_bins),
                    amp=default_amp(device) if args.amp is None else args.amp,
                    channels_last=True if args.channels_last is None else args.channels_last,
                    reuse_memory=default_reuse_memory(device) if args.reuse_memory is None else args.reuse_memory,
                    num_workers=workers, model_options=model_options, data_dir=args.data_dir or demo_dir,
                    world=world, global_batch=args.batch_size * world * args.accum_steps,
                    mean=tuple(info.mean), std=tuple(info.std),
                    face=faces.FaceSettings(args.face_crop).to_dict() if args.face_crop != "none" else None)
