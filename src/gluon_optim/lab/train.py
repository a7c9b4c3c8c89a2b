"""One training loop for every model, optimizer and data set of the lab.

A run is a folder::

    runs/<name>/
        config.json      the resolved configuration (lr and options actually used)
        meta.json        code version (git SHA, dirty flag), torch version, device, threads
        groups.txt       the parameter-group table (what the optimizer does to each parameter)
        metrics.jsonl    one JSON object per logged step (and per evaluation)
        checkpoint.pt    model, optimizer(s), step, RNG state; written atomically
        summary.json     final numbers, written at the end

Reproducibility: batches are a pure function of (seed, split, step) (see
:mod:`gluon_optim.lab.data`), so a resumed run sees exactly the data an uninterrupted run sees;
with the model, optimizer state and RNG restored from the checkpoint it continues bit for bit on
the CPU. A killed run loses at most the steps since its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn

import gluon_optim as go
from gluon_optim.lab import optimizers as optim_registry
from gluon_optim.lab.data import ImageDataset, TokenDataset, load_data
from gluon_optim.lab.models import GPTConfig, build_model, model_config, model_task
from gluon_optim.storage import STATE_DTYPES

#: The lr schedules, with a note for the names that need one (the help text shows it).
SCHEDULE_NOTES = {"constant": "", "wsd": "warmup-stable-decay", "cosine": ""}
SCHEDULES = tuple(SCHEDULE_NOTES)
#: Data parallelism under torchrun.
PARALLEL_NOTES = {
    "none": "one process",
    "ddp": "DistributedDataParallel over torchrun's processes; Gluon optimizers run "
    "distributed='replicated'",
    "fsdp2": "FSDP2 (fully_shard of the whole model) over torchrun's processes: every parameter "
    "a Shard(0) DTensor, Gluon optimizers run distributed='sharded'",
}
#: How a data-parallel run splits its batches.
BATCH_SPLIT_NOTES = {
    "rank": "each rank takes its slice of a global batch of W x batch-size: W ranks see what "
    "one process sees at W x batch-size",
    "none": "every rank takes the same batch of batch-size: no speed-up, but the iterates "
    "equal one process's bit for bit (a correctness check)",
}
#: Gluon's radius policies (Gluon Theorems 1 and 2), offered as ``--radius-policy``.
RADIUS_POLICIES = tuple(go.radius.POLICIES)


@dataclass(frozen=True)
class Shortcut:
    """A flag that sets one key of a dict field: ``--fit FILE`` is ``--opt fit=FILE``."""

    flag: str  # without the leading dashes
    key: str
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Option:
    """How a :class:`RunConfig` field is set on the command line (``metadata={"cli": ...}``).

    The field's annotation says how a value is parsed: ``int``, ``float``, ``str`` (``X | None``
    as ``X``), and a ``dict`` as repeatable ``KEY=VALUE`` pairs, the value JSON where it parses.
    The command line (:mod:`gluon_optim.lab.cli`) generates its options from these and appends
    the default to the help text.
    """

    help: str
    flag: str = ""  # without the leading dashes; "": the field name with dashes
    # name -> description; a function, since the optimizer names come from the registry.
    choices: Callable[[], Mapping[str, str]] | None = None
    # compare and sweep set it per run (--optimizers name@lr, --lrs, --seeds), so only `train`
    # offers it: a compare-wide --lr would be overridden by every spec.
    varied: bool = False
    shortcuts: tuple[Shortcut, ...] = ()


def option_of(f: dataclasses.Field[Any]) -> Option:
    """The command-line declaration of a :class:`RunConfig` field."""
    opt = f.metadata["cli"]
    assert isinstance(opt, Option)
    return opt


class ConfigError(ValueError):
    """An invalid :class:`RunConfig` field; ``field`` names it (the CLI maps it to its flag)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def _setting(default: object, option: Option) -> Any:
    """A :class:`RunConfig` field and its command-line declaration.

    Typed ``Any``, like :func:`dataclasses.field`, so the annotation on the left is what the
    type checker sees. A dict default becomes a factory: every config gets its own dict.
    """
    if isinstance(default, dict):
        return field(default_factory=functools.partial(dict, default), metadata={"cli": option})
    return field(default=default, metadata={"cli": option})


def _optimizer_names() -> dict[str, str]:
    return {name: entry.help for name, entry in optim_registry.OPTIMIZERS.items()}


_OPT_SHORTCUTS = (
    Shortcut(
        "radius-policy",
        "radius_policy",
        "radius policy of the Gluon-family optimizers (Gluon Theorems 1 and 2)",
        choices=RADIUS_POLICIES,
    ),
    Shortcut(
        "state-dtype",
        "state_dtype",
        "dtype the optimizer keeps its momenta and AdamW moments in (auto: the parameters'); "
        "adamw then runs as gluon_optim's AdamW groups, torch.optim.AdamW's update",
        choices=tuple(STATE_DTYPES),
    ),
    Shortcut(
        "fit",
        "fit",
        "gluon optimizer: take each role's (L0, L1) from FILE (fits-role.json written by "
        "`gluon-optim smoothness`) and use the l0l1 radius; lr then defaults to 1",
        metavar="FILE",
    ),
)


@dataclass
class RunConfig:
    """Everything that defines a run. ``lr=None`` takes the optimizer's tuned default.

    This is the one declaration of a run's settings: each field's metadata holds its
    command-line :class:`Option`, from which ``gluon-optim train`` (and the other commands that
    take run settings) generate their options.
    """

    model: str = _setting(
        "gpt-tiny",
        Option("model preset: gpt-tiny, gpt-small, moe-tiny, gpt2-124m, cnn-small, vit-tiny"),
    )
    data: str = _setting(
        "stdlib",
        Option(
            "data: stdlib (Python's own sources as bytes), text:PATH (file or folder), "
            "shards:TRAIN_GLOB,VAL_GLOB (nanoGPT .bin), digits, cifar10:PATH"
        ),
    )
    optimizer: str = _setting("unscion", Option("optimizer", choices=_optimizer_names, varied=True))
    lr: float | None = _setting(
        None,
        Option("learning rate; default: the optimizer's tuned default for the model", varied=True),
    )
    opt_options: dict[str, Any] = _setting(
        {},
        Option(
            "optimizer option, repeatable; VALUE is JSON if it parses "
            "(--opt momentum=0.95 --opt 'scales={\"hidden\": 30}')",
            flag="opt",
            shortcuts=_OPT_SHORTCUTS,
        ),
    )
    model_options: dict[str, Any] = _setting(
        {},
        Option(
            "model config override, repeatable (--model-opt n_layer=4 --model-opt tied=true)",
            flag="model-opt",
        ),
    )
    steps: int = _setting(200, Option("optimizer steps"))
    batch_size: int = _setting(
        16, Option("sequences or images per micro-batch; <= 0: full batch for images")
    )
    block_size: int | None = _setting(
        None, Option("tokens per sequence (default: the model's context length)")
    )
    grad_accum: int = _setting(1, Option("micro-batches per step"))
    schedule: str = _setting("constant", Option("lr schedule", choices=lambda: SCHEDULE_NOTES))
    warmup: int = _setting(0, Option("linear warmup steps"))
    decay_frac: float = _setting(0.2, Option("wsd: fraction of steps in the final linear decay"))
    eval_every: int = _setting(50, Option("validation every N steps, and at the end"))
    eval_batches: int = _setting(8, Option("validation batches for text data"))
    checkpoint_every: int = _setting(0, Option("checkpoint every N steps, 0: only at the end"))
    seed: int = _setting(0, Option("seed for init and data order", varied=True))
    probe_every: int = _setting(
        0,
        Option(
            "measure layer-wise smoothness every N steps into smoothness.jsonl "
            "(Gluon optimizers), 0: off"
        ),
    )
    probe_displacement: str = _setting(
        "",
        Option(
            "with --probe-every: also the controlled-displacement estimate (the same fixed "
            "batch at X and X + s d) at these multiples s of each layer's radius, "
            "comma-separated (e.g. 0.1,0.3,1,3), into displacement.jsonl"
        ),
    )
    probe_batches: int = _setting(
        4,
        Option(
            "batches in the fixed batch of --probe-displacement (images with batch size "
            "<= 0: the full training set)"
        ),
    )
    threads: int | None = _setting(None, Option("torch CPU threads (default: torch's)"))
    parallel: str = _setting(
        "none", Option("data parallelism (run under torchrun)", choices=lambda: PARALLEL_NOTES)
    )
    batch_split: str = _setting(
        "rank", Option("data parallelism: how batches split", choices=lambda: BATCH_SPLIT_NOTES)
    )
    data_cache: str | None = _setting(
        None,
        Option(
            "cache folder for the tokenised corpus "
            "(default $GLUON_OPTIM_CACHE or ~/.cache/gluon-optim)"
        ),
    )

    def displacement_scales(self) -> list[float]:
        """``probe_displacement`` as numbers (``[]`` when off)."""
        return [float(x) for x in self.probe_displacement.split(",") if x.strip()]

    def validate(self) -> None:
        """Raise :class:`ConfigError` (a ``ValueError``) naming the first invalid field."""
        for name, lookup in (("optimizer", optim_registry.get), ("model", model_task)):
            try:
                lookup(getattr(self, name))
            except ValueError as exc:
                raise ConfigError(name, str(exc)) from None
        for name, ok, need in self._checks():
            if not ok:
                raise ConfigError(name, f"Invalid {name}: {getattr(self, name)!r} ({need})")
        for name, allowed in (
            ("schedule", SCHEDULES),
            ("parallel", tuple(PARALLEL_NOTES)),
            ("batch_split", tuple(BATCH_SPLIT_NOTES)),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    name, f"Unknown {name} {getattr(self, name)!r}; expected one of {allowed}"
                )
        try:
            scales = self.displacement_scales()
        except ValueError:
            scales = [-1.0]
        if not all(s > 0 and math.isfinite(s) for s in scales):
            raise ConfigError(
                "probe_displacement",
                f"Invalid probe_displacement: {self.probe_displacement!r} (need comma-separated "
                "numbers > 0)",
            )
        if scales and not self.probe_every:
            raise ConfigError(
                "probe_displacement", "probe_displacement needs probe_every > 0 (when to measure)"
            )
        if self.parallel == "fsdp2" and scales:
            raise ConfigError(
                "probe_displacement",
                "the displacement probe does not run under --parallel fsdp2 yet (it takes LMO "
                "steps of whole tensors); probe a --parallel ddp or one-process run",
            )
        fit = self.opt_options.get("fit")
        if fit is not None:
            if not optim_registry.get(self.optimizer).takes_fit:
                raise ConfigError(
                    "opt_options",
                    f"--fit needs --optimizer gluon (it sets Gluon's Theorem 1 radii), "
                    f"not {self.optimizer!r}",
                )
            if not Path(str(fit)).is_file():
                raise ConfigError("opt_options", f"--fit {fit}: no such file")
        state_dtype = self.opt_options.get("state_dtype", "auto")
        if state_dtype != "auto" and not optim_registry.get(self.optimizer).takes_state_dtype:
            raise ConfigError(
                "opt_options",
                f"--state-dtype {state_dtype}: {self.optimizer!r} is a peer that keeps its "
                "state in the parameters' dtype; use muon (our Muon) to compare state dtypes",
            )
        if model_task(self.model) == "lm" and self.batch_size < 1:
            raise ConfigError(
                "batch_size",
                f"Invalid batch_size: {self.batch_size} (language models need >= 1)",
            )

    def _checks(self) -> list[tuple[str, bool, str]]:
        """(field, valid, what a valid value is) for the fields that need no other field."""
        return [
            ("steps", self.steps >= 1, "need >= 1"),
            ("grad_accum", self.grad_accum >= 1, "need >= 1"),
            ("eval_every", self.eval_every >= 1, "need >= 1"),
            ("eval_batches", self.eval_batches >= 1, "need >= 1"),
            ("checkpoint_every", self.checkpoint_every >= 0, "need >= 0"),
            ("probe_every", self.probe_every >= 0, "need >= 0"),
            ("probe_batches", self.probe_batches >= 1, "need >= 1"),
            ("warmup", 0 <= self.warmup < self.steps or self.warmup == 0, "need 0 or < steps"),
            ("decay_frac", 0.0 <= self.decay_frac <= 1.0, "need 0 to 1"),
            (
                "lr",
                self.lr is None or (self.lr > 0 and math.isfinite(self.lr)),
                "need a finite lr > 0",
            ),
            ("block_size", self.block_size is None or self.block_size >= 1, "need >= 1"),
            ("threads", self.threads is None or self.threads >= 1, "need >= 1"),
        ]


def lr_multiplier(config: RunConfig, step: int) -> float:
    """The schedule's factor on every group's base lr at ``step`` (0-based)."""
    if config.warmup and step < config.warmup:
        return (step + 1) / config.warmup
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "cosine":
        span = max(1, config.steps - config.warmup)
        progress = (step - config.warmup) / span
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    # warmup-stable-decay: constant, then linear to zero over the last decay_frac of the run
    decay_steps = int(round(config.decay_frac * config.steps))
    start = config.steps - decay_steps
    if decay_steps == 0 or step < start:
        return 1.0
    return max(0.0, (config.steps - step) / decay_steps)


@dataclass
class RunResult:
    """What a finished run reports (also written as ``summary.json``)."""

    run_dir: str
    optimizer: str
    seed: int
    steps: int
    final_val_loss: float
    final_val_accuracy: float | None
    train_time_s: float
    optimizer_state_bytes: int
    lr: float
    # Robust to the stalls of a shared machine, unlike the total time.
    median_step_ms: float = math.nan


def state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes held in optimizer state tensors (momentum buffers, Adam moments, ...).

    Containers inside a parameter's state are walked too: HeavyBall, for one, keeps each
    parameter's tensors one level down (``state[p][0][name]``).
    """

    def walk(x: object) -> int:
        if isinstance(x, Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, Mapping):
            return sum(walk(v) for v in x.values())
        if isinstance(x, list | tuple):
            return sum(walk(v) for v in x)
        return 0

    return sum(walk(state) for opt in optimizers for state in opt.state.values())


def code_version() -> dict[str, Any]:
    """Git SHA and dirty flag of the working tree this code runs from, when available."""
    root = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        sha, dirty = "unknown", False
    from gluon_optim import __version__

    return {"git_sha": sha, "dirty": dirty, "gluon_optim": __version__}


def tensor_checksum(obj: Any) -> str:
    """SHA-256 over every tensor in ``obj`` (nested dicts, lists), in a fixed order.

    Stored in a checkpoint and checked on resume, so a flipped bit is an error, not a run that
    quietly continues from corrupted weights.
    """
    digest = hashlib.sha256()

    def walk(x: object, path: str) -> None:
        if isinstance(x, Tensor):
            digest.update(path.encode())
            # The uint8 view's buffer itself, without a bytes copy of every tensor.
            digest.update(x.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().data)
        elif isinstance(x, Mapping):
            for k in sorted(x, key=str):
                walk(x[k], f"{path}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}/{i}")

    walk(obj, "")
    return digest.hexdigest()


#: The checkpoint's non-tensor entries that :func:`meta_checksum` covers.
_META = ("step", "elapsed", "grad_evals", "config")


def meta_checksum(ckpt: Mapping[str, Any]) -> str:
    """SHA-256 of the checkpoint's step, time, gradient count and configuration, as JSON.

    The tensors' checksum cannot see these, and an edited step resumes at another point of
    the schedule with the right weights, which no later check would notice.
    """
    payload = json.dumps({k: ckpt.get(k) for k in _META}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def check_checkpoint(ckpt: Mapping[str, Any], config: RunConfig, path: Path) -> None:
    """Raise :class:`RunFolderError` (a ``ValueError``) unless ``ckpt`` is intact and belongs to
    the run ``config`` describes.

    The checkpoint carries the resolved configuration it was written under and a checksum of
    its tensors and of its other entries (checkpoints written before 0.2.0 carry neither and
    are not verified; 0.2.0's carry only the first). Only
    ``steps`` may differ (a longer constant-schedule run), and the checkpoint's step must be
    within the run.
    """
    if "checksum" in ckpt:
        tensors = {k: ckpt[k] for k in ("model", "optimizers", "rng")}
        if tensor_checksum(tensors) != ckpt["checksum"]:
            raise RunFolderError(f"{path}: corrupt (the tensors do not match their checksum)")
    if "meta_checksum" in ckpt and meta_checksum(ckpt) != ckpt["meta_checksum"]:
        raise RunFolderError(
            f"{path}: corrupt (its step, time, gradient count or config do not match their"
            " checksum)"
        )
    if "config" in ckpt:
        saved, now = dict(ckpt["config"]), dataclasses.asdict(config)
        differ = [
            k for k in sorted(set(saved) | set(now)) if k != "steps" and saved.get(k) != now.get(k)
        ]
        if differ:
            details = "; ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} here" for k in differ)
            raise RunFolderError(f"{path} belongs to another run ({details})")
    if int(ckpt["step"]) > config.steps:
        raise RunFolderError(
            f"{path} is at step {int(ckpt['step'])}, past the run's {config.steps} steps"
        )
    if int(ckpt["step"]) < 0:
        raise RunFolderError(f"{path} is at step {int(ckpt['step'])}, before the run's start")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any point leaves either the previous file or the new one, never a torn file.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); a checkpoint gets the mode of any new file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# -- reading a run folder back ---------------------------------------------------------------------


class RunFolderError(ValueError):
    """A run folder's file that cannot be used as it is. The message is one line that names the
    file and what is wrong with it; nothing in the folder was changed."""


#: The checkpoint entries :func:`train` writes, with the types they must have.
_CHECKPOINT_ENTRIES: dict[str, tuple[type, ...]] = {
    "model": (dict,),
    "optimizers": (list,),
    "rng": (Tensor,),
    "step": (int,),
    "elapsed": (int, float),
}
#: Entries older checkpoints may lack.
_CHECKPOINT_OPTIONAL: dict[str, tuple[type, ...]] = {
    "grad_evals": (int,),
    "config": (dict,),
    "checksum": (str,),
    "meta_checksum": (str,),
}


def short_cause(exc: BaseException) -> str:
    """One line of ``exc``'s message: what went wrong, without torch's advice around it.

    torch's unpickling errors are paragraphs; the line after ``WeightsUnpickler error:`` is the
    cause. Otherwise the first non-empty line (with the next one where it ends in a colon, as
    ``Error(s) in loading state_dict for GPT:`` does) up to its first sentence's end.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if found:
        cause = "unpickling failed: " + found.group(1).strip()
    elif lines:
        cause = lines[0] if not lines[0].endswith(":") else " ".join(lines[:2])
    else:
        return type(exc).__name__
    cause = cause.split(". ")[0].rstrip(".")
    return cause if len(cause) <= 240 else cause[:237] + "..."


def _json_kind(value: object) -> str:
    """What ``value`` is, in JSON's words."""
    names: tuple[tuple[type, str], ...] = (
        (type(None), "null"),
        (bool, "true/false"),  # before int: a bool is an int
        (int, "a whole number"),
        (float, "a number"),
        (str, "a string"),
        (list, "a list"),
        (dict, "an object"),
    )
    return next((name for kind, name in names if isinstance(value, kind)), type(value).__name__)


def _type_error(name: str, value: object) -> str | None:
    """What RunConfig field ``name`` needs where ``value`` is not it (``None``: it is)."""
    hint = typing.get_type_hints(RunConfig)[name]
    if typing.get_origin(hint) is dict:
        return None if isinstance(value, dict) else "an object"
    args = typing.get_args(hint) or (hint,)
    optional = type(None) in args
    kind = next(t for t in args if t is not type(None))
    need = {int: "a whole number", float: "a number", str: "a string"}[kind]
    need += " or null" if optional else ""
    if value is None:
        return None if optional else need
    if isinstance(value, bool):
        return need
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
    return None if ok else need


def read_run_config(run_dir: str | Path) -> tuple[dict[str, Any], RunConfig]:
    """``run_dir/config.json``: the saved document and its :class:`RunConfig` (not validated).

    Raises :class:`RunFolderError` for a missing or unreadable file, text that is not JSON, a
    document without its ``"config"`` object, a key that is not a RunConfig field and a value
    of the wrong JSON type. A key it lacks takes RunConfig's default.
    """
    path = Path(run_dir) / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunFolderError(f"{path}: no such file (not a run folder?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path}: unreadable ({short_cause(exc)})") from None
    try:
        saved = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path}: not JSON ({exc})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise RunFolderError(
            f'{path}: no "config" object (a run\'s config.json is {{"config": {{...the run\'s '
            'settings...}, "lr": ..., "options": {...}})'
        )
    values: dict[str, Any] = saved["config"]
    known = [f.name for f in dataclasses.fields(RunConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        keys = ", ".join(repr(k) for k in unknown)
        close = [m for k in unknown for m in difflib.get_close_matches(k, known, n=1)]
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise RunFolderError(
            f'{path}: unknown key{"s" if len(unknown) > 1 else ""} {keys} in "config"{hint}; '
            f"the known keys are RunConfig's fields: {', '.join(known)}"
        )
    for name, value in values.items():
        need = _type_error(name, value)
        if need:
            raise RunFolderError(
                f'{path}: "config" key {name!r} is {json.dumps(value)} ({_json_kind(value)}); '
                f"it must be {need}"
            )
    return saved, RunConfig(**values)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` a lab checkpoint (tensors only); :class:`RunFolderError` unless it is one.

    The error names the file and one line of cause: an empty file, a file with no zip header
    (``torch.save`` writes a zip archive: zeroed, overwritten or not a checkpoint), torch's own
    reason (a truncated archive, a failed unpickling), or the entry it lacks.
    """
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"{path}: no such file")
    if not path.is_file():
        raise RunFolderError(f"{path}: not a file")
    try:
        ckpt = torch.load(path, weights_only=True)
    except Exception as exc:  # whatever torch raises for a damaged file, as one line
        with path.open("rb") as f:
            head = f.read(4)
        if not head:
            cause = "empty file"
        elif head != b"PK\x03\x04":
            cause = "no zip header, as torch.save writes: zeroed, overwritten or another file"
        else:
            cause = short_cause(exc)
        raise RunFolderError(f"{path}: not a readable checkpoint ({cause})") from None
    if not isinstance(ckpt, dict):
        raise RunFolderError(
            f"{path}: not a lab checkpoint (it holds {type(ckpt).__name__}, not a dict)"
        )
    for entries, required in ((_CHECKPOINT_ENTRIES, True), (_CHECKPOINT_OPTIONAL, False)):
        for key, kinds in entries.items():
            if key not in ckpt:
                if required:
                    raise RunFolderError(f"{path}: not a lab checkpoint (no {key!r} entry)")
                continue
            if not isinstance(ckpt[key], kinds) or isinstance(ckpt[key], bool):
                names = " or ".join(k.__name__ for k in kinds)
                raise RunFolderError(
                    f"{path}: not a lab checkpoint ({key!r} is {type(ckpt[key]).__name__}, "
                    f"not {names})"
                )
    if not all(isinstance(v, Tensor) for v in ckpt["model"].values()):
        raise RunFolderError(f"{path}: not a lab checkpoint ('model' holds more than tensors)")
    return ckpt


class _Progress:
    """A one-line progress bar on a terminal; plain periodic lines otherwise."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.every = max(1, total // 10)

    def update(self, step: int, loss: float, rate: float, unit: str) -> None:
        if not self.enabled:
            return
        done = step + 1
        text = f"{self.label} {done}/{self.total} loss {loss:.4f} {rate:,.0f} {unit}/s"
        if self.tty:
            width = 24
            filled = int(width * done / self.total)
            bar = "#" * filled + "." * (width - filled)
            sys.stderr.write(f"\r[{bar}] {text}")
            if done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif done % self.every == 0 or done == self.total:
            print(text, file=sys.stderr, flush=True)


def _state_metrics(optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
    """Optimizer-state bytes for ``metrics.jsonl``, in one pass over the state.

    For Gluon the total is split into momentum and two-point copies (previous iterate or
    gradient), so a low-rank momentum's saving is never confused with what its correction needs.
    """
    if not all(isinstance(opt, go.Gluon) for opt in optimizers):
        return {"opt_state_bytes": state_bytes(optimizers)}
    split = [opt.state_bytes() for opt in optimizers if isinstance(opt, go.Gluon)]
    return {
        "opt_state_bytes": sum(s["total"] for s in split),
        "opt_state_momentum": sum(s["momentum"] for s in split),
        "opt_state_two_point": sum(s["two_point"] for s in split),
    }


def needs_closure(optimizers: list[torch.optim.Optimizer]) -> bool:
    """Whether a step needs ``step(closure)`` (:meth:`gluon_optim.Gluon.needs_closure`).

    Such an optimizer evaluates the same batch at the previous and the current iterate, which
    only one optimizer object can orchestrate; the lab's optimizer entries respect that.
    """
    exact = [opt for opt in optimizers if isinstance(opt, go.Gluon) and opt.needs_closure()]
    if exact and len(optimizers) > 1:
        raise ValueError("an exact two-point optimizer must be the only optimizer of a run")
    return bool(exact)


def _step(
    optimizers: list[torch.optim.Optimizer], closure: Callable[[], Tensor], two_point: bool
) -> Tensor:
    if two_point:
        result: Any = optimizers[0].step(closure)  # type: ignore[arg-type]
        assert isinstance(result, Tensor)
        return result
    loss = closure()
    for opt in optimizers:
        opt.step()
    return loss


#: Where the fixed probe batch of ``probe_displacement`` is drawn from: batch indices far past
#: any run's own, so the probe batch is the same at every step and is no step's batch.
_PROBE_BATCH_OFFSET = 10**7


def _train_batch(
    data: Any, config: RunConfig, index: int, block_size: int, shards: int, rank: int
) -> tuple[Tensor, Tensor]:
    """This rank's slice of global training batch ``index``.

    Every rank draws the same global batch and keeps its slice, so W ranks see what one
    process sees at W x batch_size.
    """
    size = config.batch_size * shards if config.batch_size > 0 else config.batch_size
    if isinstance(data, TokenDataset):
        x, y = data.batch("train", index, size, block_size, config.seed)
    else:
        x, y = data.batch("train", index, size, config.seed)
    if shards > 1:
        x, y = x.chunk(shards)[rank], y.chunk(shards)[rank]
    return x, y


def _displacement_probe(
    config: RunConfig,
    optimizer: Any,
    net: nn.Module,
    draw: Callable[[int], tuple[Tensor, Tensor]],
    lead: bool,
    run_path: Path,
) -> Callable[[int], None]:
    """The controlled-displacement measurement of a run: ``measure(step)`` after a step.

    The loss is that of a fixed batch (``probe_batches`` training batches, or the whole set for
    full-batch images), with the dropout masks drawn from the same seed every call, so the
    measured function is deterministic. The run is left exactly as it was: the RNG state, the
    model's buffers (BatchNorm statistics), every parameter and every ``.grad``.
    """
    if not isinstance(optimizer, go.Gluon):
        raise ValueError("probe_displacement needs one gluon_optim.Gluon optimizer")
    count = 1 if config.batch_size <= 0 else config.probe_batches
    fixed = [draw(_PROBE_BATCH_OFFSET + i) for i in range(count)]

    def loss() -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            total: Tensor = sum((batch_loss(net, x, y) for x, y in fixed), torch.zeros(()))
        return total / len(fixed)

    probe = go.smoothness.DisplacementProbe(
        optimizer,
        loss,
        config.displacement_scales(),
        every=0,
        sink=run_path / "displacement.jsonl" if lead else None,
    )

    def measure(step: int) -> None:
        buffers = {k: b.clone() for k, b in net.named_buffers()}
        try:
            probe.measure(step)
        finally:
            with torch.no_grad():
                for k, b in net.named_buffers():
                    b.copy_(buffers[k])

    return measure


def batch_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of ``model`` on one batch (the training loss, the bench's too)."""
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: TokenDataset | ImageDataset,
    config: RunConfig,
    block_size: int,
    world: int = 1,
) -> tuple[float, float | None]:
    """Mean validation loss (and accuracy for images) on a fixed set of batches.

    Under data parallelism every rank evaluates the same batches of the global batch size
    (``world`` x ``batch_size``), so the number equals a one-process run's at that batch size.
    """
    was_training = model.training
    model.eval()
    if isinstance(data, TokenDataset):
        batches = data.eval_batches(
            "val", config.eval_batches, max(config.batch_size, 1) * world, block_size
        )
    else:
        batches = data.eval_batches("val", 512)
    total, correct, count = 0.0, 0, 0
    for x, y in batches:
        logits = model(x)
        total += nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"
        ).item()
        correct += int((logits.argmax(-1) == y).sum().item())
        count += y.numel()
    model.train(was_training)
    accuracy = correct / count if isinstance(data, ImageDataset) else None
    return total / count, accuracy


def _whole(tree: Any) -> Any:
    """``tree`` with every DTensor replaced by the whole tensor (a collective, on every rank,
    in the same order): checkpoints of a sharded run have one process's format, so they resume
    at any world size and in one process."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        return tree.full_tensor()
    if isinstance(tree, dict):
        return {k: _whole(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_whole(v) for v in tree]
    return tree


def _shard_state(opt: torch.optim.Optimizer) -> None:
    """A peer optimizer's loaded state as DTensors laid out like their parameters (torch's
    ``load_state_dict`` keeps the whole tensors it was given)."""
    from torch.distributed.tensor import DTensor

    for p, state in opt.state.items():
        if not isinstance(p, DTensor):
            continue
        for key, value in state.items():
            if isinstance(value, Tensor) and not isinstance(value, DTensor):
                if value.shape == p.shape and value.ndim > 0:
                    state[key] = go.distributed.shard_like(value, p)


def _load_model(model: nn.Module, state: Mapping[str, Any], sharded: bool) -> None:
    """Load whole tensors into ``model``; a sharded model keeps each rank's rows
    (``torch.distributed.checkpoint``'s full-state-dict loader)."""
    if not sharded:
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))


def _start_parallel(config: RunConfig) -> tuple[int, int]:
    """``(rank, world)``; under ``parallel="ddp"`` or ``"fsdp2"`` joins torchrun's process
    group first.

    gloo on CPU (the lab trains on the CPU). The ranks come from torchrun's environment.
    """
    if config.parallel == "none":
        return 0, 1
    import torch.distributed as dist

    if dist.is_initialized():  # a caller's group (the lab's own spawner, a test)
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "parallel",
            f"--parallel {config.parallel} runs under torchrun (RANK and WORLD_SIZE are not "
            "set): torchrun --standalone --nproc-per-node 2 -m gluon_optim.lab train ...",
        )
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def _mean_over_ranks(value: Tensor, world: int) -> Tensor:
    """The mean of ``value`` over the ranks (gloo has no AVG: a SUM, then a division)."""
    if world == 1:
        return value
    import torch.distributed as dist

    total = value.detach().clone()
    dist.all_reduce(total)
    return total / world


def _model_for(config: RunConfig, data: TokenDataset | ImageDataset) -> nn.Module:
    if isinstance(data, TokenDataset):
        if model_task(config.model) != "lm":
            raise ValueError(
                f"Model {config.model!r} is an image model; data {config.data!r} is text"
            )
        return build_model(config.model, vocab_size=data.vocab_size, **config.model_options)
    if model_task(config.model) != "image":
        raise ValueError(
            f"Model {config.model!r} is a language model; data {config.data!r} is images"
        )
    return build_model(
        config.model,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        **config.model_options,
    )


@dataclass
class _Resumed:
    """What a resumed run's folder holds, read and checked before anything in it is written."""

    saved_config: dict[str, Any]  # config.json as it is on disk
    ckpt: dict[str, Any]
    logs: dict[Path, list[dict[str, Any]]]  # the JSON-lines logs, each record checked


def _read_resume(run_path: Path, steps: int | None) -> tuple[RunConfig, _Resumed]:
    """The folder's configuration (with ``steps`` applied) and its checked contents."""
    ckpt_path = run_path / "checkpoint.pt"
    if not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    saved_config, config = read_run_config(run_path)
    try:
        config.validate()
    except ConfigError as exc:  # the folder's setting, not a command-line option's
        raise RunFolderError(f"{run_path / 'config.json'}: {exc}") from None
    if steps is not None and steps != config.steps:
        if config.schedule != "constant" or config.warmup:
            raise ConfigError(
                "steps",
                f"--steps {steps} would change this run's {config.schedule} schedule "
                "(it depends on the total); start a new run instead",
            )
        config = dataclasses.replace(config, steps=steps)
    ckpt = load_checkpoint(ckpt_path)
    check_checkpoint(ckpt, config, ckpt_path)
    logs = {
        path: _records(path, _METRIC_NUMBERS if path.name == "metrics.jsonl" else ())
        for path in (run_path / name for name in _LOGS)
        if path.exists()
    }
    return config, _Resumed(saved_config, ckpt, logs)


@dataclass
class _Run:
    """One process's share of a run: its rank, the data, the model and its optimizers."""

    config: RunConfig
    path: Path
    rank: int
    world: int
    shards: int  # the ranks whose slices make up one global batch (1: each takes all of it)
    data: TokenDataset | ImageDataset
    model: nn.Module
    net: nn.Module  # what the forward runs: the model, or its DDP wrapper
    optimizers: list[torch.optim.Optimizer]
    lr: float
    options: dict[str, Any]
    block_size: int  # 0 for an image task

    @property
    def lead(self) -> bool:
        """The one rank that writes files and shows progress."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.config.parallel == "fsdp2"

    def batch(self, index: int) -> tuple[Tensor, Tensor]:
        """Training batch ``index`` (this rank's slice of it under ``batch_split="rank"``)."""
        return _train_batch(self.data, self.config, index, self.block_size, self.shards, self.rank)


def _setup(config: RunConfig, run_path: Path) -> _Run:
    """Join the process group, build the data, the model (sharded or wrapped) and optimizers."""
    rank, world = _start_parallel(config)
    if rank == 0 and run_path.is_dir():
        _remove_torn_files(run_path)
    data = load_data(config.data, cache_dir=config.data_cache)
    torch.manual_seed(config.seed)
    model = _model_for(config, data)
    block_size = 0
    if isinstance(data, TokenDataset):
        model_cfg = model_config(config.model, **config.model_options)
        assert isinstance(model_cfg, GPTConfig)  # _model_for checked the task
        block_size = config.block_size or model_cfg.block_size
    lr, options = optim_registry.resolve(
        config.optimizer, config.model, config.lr, config.opt_options
    )
    sharded = config.parallel == "fsdp2"
    if sharded:
        from torch.distributed.fsdp import fully_shard

        # The optimizer must see the DTensor parameters (distributed="auto" -> "sharded").
        fully_shard(model)
    parallel = config.parallel if world > 1 or sharded else "none"
    optimizers = optim_registry.build(config.optimizer, model, lr, options, parallel=parallel)
    # Only now: an option the optimizer refuses leaves no empty run folder behind.
    run_path.mkdir(parents=True, exist_ok=True)
    net = model
    if world > 1 and not sharded:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
    shards = world if config.batch_split == "rank" else 1
    return _Run(
        config, run_path, rank, world, shards, data, model, net, optimizers, lr, options, block_size
    )


def _restore(
    run: _Run, resumed: _Resumed, progress: bool, steps: int | None
) -> tuple[int, float, int]:
    """Load the checkpoint into ``run``, cut the logs back to it; ``(step, elapsed, evals)``."""
    ckpt, ckpt_path = resumed.ckpt, run.path / "checkpoint.pt"
    try:
        _load_model(run.model, ckpt["model"], run.sharded)
        for opt, sd in zip(run.optimizers, ckpt["optimizers"], strict=True):
            opt.load_state_dict(sd)  # whole tensors: a sharded Gluon keeps its rows
            if run.sharded and not isinstance(opt, go.Gluon):
                _shard_state(opt)
        torch.set_rng_state(ckpt["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        # A checkpoint without the run's configuration in it (written before 0.2.0).
        raise RunFolderError(
            f"{ckpt_path}: does not fit the model and optimizers of "
            f"{run.path / 'config.json'} ({short_cause(exc)})"
        ) from None
    start_step = int(ckpt["step"])
    if run.lead:
        if progress:
            print(f"resuming at step {start_step} of {run.config.steps}", file=sys.stderr)
        for path, records in resumed.logs.items():
            _truncate_jsonl(path, records, start_step)
        if steps is not None:
            resumed.saved_config["config"]["steps"] = run.config.steps
            _write_json(run.path / "config.json", resumed.saved_config)
    return start_step, float(ckpt["elapsed"]), int(ckpt.get("grad_evals", 0))


def _write_new_run(run: _Run) -> None:
    """A new run folder's config.json, meta.json, groups.txt and empty metrics.jsonl."""
    resolved = dataclasses.asdict(run.config)
    _write_json(
        run.path / "config.json", {"config": resolved, "lr": run.lr, "options": run.options}
    )
    meta = {
        **code_version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "world_size": run.world,
        "parameters": sum(p.numel() for p in run.model.parameters()),
    }
    _write_json(run.path / "meta.json", meta)
    (run.path / "groups.txt").write_text(optim_registry.describe(run.optimizers) + "\n")
    (run.path / "metrics.jsonl").write_text("")


def _save_checkpoint(run: _Run, step: int, elapsed: float, grad_evals: int) -> None:
    """Rank 0 writes the checkpoint. Under fsdp2 every rank first takes part in gathering the
    whole tensors; under ddp the state is already whole and the same everywhere."""
    if not run.lead and not run.sharded:
        return
    tensors = {
        "model": _whole(run.model.state_dict()),
        "optimizers": [_whole(opt.state_dict()) for opt in run.optimizers],
        "rng": torch.get_rng_state(),
    }
    if not run.lead:
        return
    meta = {
        "step": step,
        "elapsed": elapsed,
        "grad_evals": grad_evals,
        # What it belongs to and what it holds, checked on resume.
        "config": dataclasses.asdict(run.config),
    }
    atomic_save(
        {
            **tensors,
            **meta,
            "checksum": tensor_checksum(tensors),
            "meta_checksum": meta_checksum(meta),
        },
        run.path / "checkpoint.pt",
    )


def _smoothness_probe(run: _Run, start_step: int) -> go.smoothness.SmoothnessProbe | None:
    """The ``probe_every`` probe on the run's one Gluon optimizer, or ``None``."""
    config = run.config
    if not config.probe_every:
        return None
    if not isinstance(run.optimizers[0], go.Gluon) or len(run.optimizers) > 1:
        raise ValueError(
            f"probe_every needs one gluon_optim.Gluon optimizer; {config.optimizer!r} is not"
        )
    # Measures (k, k+1) pairs whose k+1 is a multiple of probe_every; a pair cut by a
    # checkpoint boundary is dropped, never half-measured.
    return go.smoothness.SmoothnessProbe(
        run.optimizers[0],
        config.probe_every,
        sink=run.path / "smoothness.jsonl" if run.lead else None,
        start_step=start_step + 1,  # number steps as metrics.jsonl does, from 1
    )


class _Gradients:
    """The closures of the steps, and the count of gradient evaluations they made."""

    def __init__(self, run: _Run, evals: int) -> None:
        self.run, self.evals = run, evals

    def closure(self, step: int) -> Callable[[], Tensor]:
        run, config = self.run, self.run.config

        def closure() -> Tensor:
            # One gradient evaluation of this step's batch (all micro-batches). Variance-reduced
            # optimizers in exact mode call it twice: at the previous and the current iterate.
            for opt in run.optimizers:
                opt.zero_grad(set_to_none=True)
            total = torch.zeros(())
            for micro in range(config.grad_accum):
                x, y = run.batch(step * config.grad_accum + micro)
                loss = batch_loss(run.net, x, y) / config.grad_accum
                loss.backward()  # type: ignore[no-untyped-call]
                total += loss.detach()
            self.evals += config.grad_accum
            return _mean_over_ranks(total, run.world)

        return closure


def _samples_per_step(run: _Run) -> tuple[int, str]:
    """What one step consumes across the ranks, and its unit (tokens or images)."""
    config = run.config
    if isinstance(run.data, ImageDataset) and config.batch_size <= 0:
        return run.data.num_examples("train") * config.grad_accum, "img"
    is_lm = isinstance(run.data, TokenDataset)
    per_step = config.batch_size * run.shards * config.grad_accum * (run.block_size if is_lm else 1)
    return per_step, "tok" if is_lm else "img"


def _end_parallel(run: _Run) -> None:
    """Destroy torchrun's process group (ours), after freeing the DDP wrapper that holds it."""
    if run.config.parallel != "none" and "RANK" in os.environ:
        import gc

        import torch.distributed as dist

        run.net = run.model
        gc.collect()
        dist.destroy_process_group()


def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    steps: int | None = None,
) -> RunResult:
    """Train ``config`` in ``run_dir`` (created if needed) and return the final numbers.

    Args:
        config: the run.
        run_dir: the run folder.
        resume: continue from ``run_dir/checkpoint.pt`` (the config is read from the folder).
        progress: show a progress bar (terminal) or periodic lines (pipes) on stderr.
        stop_after: stop after this many steps of this call, as if killed (for tests and for
            splitting long runs); a checkpoint is written first.
        steps: with ``resume``, run to this many steps instead of the saved number (a constant
            schedule only: the others depend on the total).
    """
    run_path = Path(run_dir)
    resumed = None
    if resume:
        # Everything the folder holds is read and checked before anything in it is written.
        config, resumed = _read_resume(run_path, steps)
    elif steps is not None:
        raise ValueError("steps= goes with resume=True; set RunConfig.steps for a new run")
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    run = _setup(config, run_path)
    start_step, elapsed, evals = 0, 0.0, 0
    if resumed is not None:
        start_step, elapsed, evals = _restore(run, resumed, progress, steps)
    elif run.lead:
        _write_new_run(run)
    end = config.steps if stop_after is None else min(config.steps, start_step + stop_after)
    probe = _smoothness_probe(run, start_step)
    displacement = None
    if config.probe_displacement:
        displacement = _displacement_probe(
            config, run.optimizers[0], run.net, run.batch, run.lead, run_path
        )
    gradients = _Gradients(run, evals)
    metrics = (run_path / "metrics.jsonl").open("a") if run.lead else None
    try:
        elapsed, val = _loop(
            run, gradients, displacement, metrics, progress, start_step, end, elapsed
        )
        saved_in_loop = (
            end > start_step and config.checkpoint_every and not end % config.checkpoint_every
        )
        if not saved_in_loop:  # the last step's checkpoint is not written twice
            _save_checkpoint(run, end, elapsed, gradients.evals)
        if run.world > 1:
            import torch.distributed as dist

            dist.barrier()  # the checkpoint and metrics are written before any rank reads them
    finally:
        if metrics is not None:
            metrics.close()
        if probe is not None:
            probe.remove()
        # The displacement probe's closure holds the DDP wrapper, which holds the group.
        displacement = None
        _end_parallel(run)
    return _result(run, end, elapsed, val)


def _loop(
    run: _Run,
    gradients: _Gradients,
    displacement: Callable[[int], None] | None,
    metrics: IO[str] | None,
    progress: bool,
    start_step: int,
    end: int,
    elapsed: float,
) -> tuple[float, tuple[float, float | None]]:
    """Steps ``start_step`` to ``end``: schedule, step, probes, metrics, evaluation and
    checkpoints. Returns the training time so far and the last evaluation (NaN if none ran)."""
    config, optimizers = run.config, run.optimizers
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    per_step, unit = _samples_per_step(run)
    two_point = needs_closure(optimizers)
    bar = _Progress(config.steps, f"{config.optimizer}/s{config.seed}", progress and run.lead)
    val: tuple[float, float | None] = (math.nan, None)
    run.model.train()
    for step in range(start_step, end):
        t0 = time.perf_counter()
        mult = lr_multiplier(config, step)
        for opt, lrs in zip(optimizers, base_lrs, strict=True):
            for g, base in zip(opt.param_groups, lrs, strict=True):
                g["lr"] = base * mult
        loss_t = _step(optimizers, gradients.closure(step), two_point)
        if displacement is not None and (step + 1) % config.probe_every == 0:
            displacement(step + 1)
        loss_sum = float(loss_t)
        dt = time.perf_counter() - t0
        elapsed += dt
        record: dict[str, Any] = {
            "step": step + 1,
            "tokens": (step + 1) * per_step,
            "loss": loss_sum,
            "lr": optimizers[0].param_groups[0]["lr"],
            "grad_evals": gradients.evals,
            "step_time": dt,
            "time": elapsed,
            **_state_metrics(optimizers),
        }
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            val = evaluate(run.model, run.data, config, run.block_size, run.shards)
            record["val_loss"] = val[0]
            if val[1] is not None:
                record["val_accuracy"] = val[1]
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        bar.update(step, loss_sum, per_step / dt if dt > 0 else 0.0, unit)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"Training loss is {loss_sum} at step {step + 1}")
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            _save_checkpoint(run, step + 1, elapsed, gradients.evals)
    return elapsed, val


def _result(run: _Run, end: int, elapsed: float, val: tuple[float, float | None]) -> RunResult:
    """The run's numbers; a finished run's are written to summary.json too."""
    config = run.config
    val_loss, val_acc = val
    if math.isnan(val_loss):  # nothing left to run (resuming a finished run)
        val_loss, val_acc = evaluate(run.model, run.data, config, run.block_size, run.shards)
    step_times = [r["step_time"] for r in read_metrics(run.path) if "step_time" in r]
    median_ms = 1000 * statistics.median(step_times) if step_times else math.nan
    result = RunResult(
        run_dir=str(run.path),
        optimizer=config.optimizer,
        seed=config.seed,
        steps=end,
        final_val_loss=val_loss,
        final_val_accuracy=val_acc,
        train_time_s=elapsed,
        optimizer_state_bytes=state_bytes(run.optimizers),
        lr=run.lr,
        median_step_ms=median_ms,
    )
    if end == config.steps and run.lead:  # stopped early on request: no summary yet
        _write_json(run.path / "summary.json", dataclasses.asdict(result))
    return result


#: The JSON-lines logs of a run folder, cut back to the checkpoint's step on resume.
_LOGS = ("metrics.jsonl", "smoothness.jsonl", "displacement.jsonl")
#: Entries of a ``metrics.jsonl`` record that must be numbers (the first: in every record).
_METRIC_NUMBERS = (
    "loss",
    "tokens",
    "lr",
    "grad_evals",
    "step_time",
    "time",
    "val_loss",
    "val_accuracy",
)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _record_problem(record: object, numbers: tuple[str, ...]) -> str | None:
    """What is wrong with one log record (``None``: nothing). Every record is a JSON object
    with a whole-number ``step``; ``numbers[0]`` must be there, and each of ``numbers`` there
    must be a number."""
    if not isinstance(record, dict):
        return f"not a JSON object but {_json_kind(record)}"
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f'no whole-number "step" (got {json.dumps(step)})'
    if numbers and numbers[0] not in record:
        return f"no {numbers[0]!r}"
    for key in numbers:
        if key in record and not _is_number(record[key]):
            return f"{key!r} is {json.dumps(record[key])}, not a number"
    return None


def _records(path: Path, numbers: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The JSON lines of ``path``. A torn last line (a kill mid-write) is dropped; a broken line
    anywhere else, or a record :func:`_record_problem` finds wrong, raises
    :class:`RunFolderError` naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path}: unreadable ({short_cause(exc)})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    out = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise RunFolderError(f"{path}:{number}: not a JSON record") from None
        problem = _record_problem(record, numbers)
        if problem:
            raise RunFolderError(f"{path}:{number}: {problem}")
        out.append(record)
    return out


def _truncate_jsonl(path: Path, records: list[dict[str, Any]], step: int) -> None:
    """Rewrite ``path`` as ``records`` up to ``step``: lines written after the checkpoint
    belong to steps that will be run again. Through a temporary file and a rename, so a kill
    during the rewrite loses nothing."""
    kept = [r for r in records if r["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def _remove_torn_files(run_path: Path) -> None:
    """Temporary files a killed write left behind (``atomic_save``, ``_write_json``, above)."""
    for pattern in (".checkpoint.pt.*.tmp", "*.json.tmp", ".*.jsonl.tmp"):
        for stale in run_path.glob(pattern):
            stale.unlink(missing_ok=True)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (a torn last line dropped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"No metrics.jsonl in {run_dir}")
    return _records(path, _METRIC_NUMBERS)
