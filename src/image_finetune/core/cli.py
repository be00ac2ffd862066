"""What the entry scripts share: composing configs, quick help, one-line errors, the run dir check, JSON/CSV writers."""

from __future__ import annotations

import ast
import contextlib
import csv
import io
import json
import logging
import os
import signal
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from image_finetune.core.atomic import atomic_write_text
from image_finetune.core.errors import RunInterrupted, UserError, is_keyboard_interrupt, writing
from image_finetune.ops.slurm import register_resolvers

log = logging.getLogger(__name__)

# Every entry script imports this module before Hydra composes: the configs use ${run_id:...} (configs/hydra).
register_resolvers()


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """Resolved plain containers: safe for hparams and ``torch.load(weights_only=True)`` checkpoints."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


def compose_config(
    config_dir: str | os.PathLike, config_name: str, overrides: list[str], output_dir: str | os.PathLike
) -> DictConfig:
    """Compose a config as ``@hydra.main`` would, for scripts and tests that call ``train(cfg)`` in-process.

    Sets Hydra's runtime so that ``${hydra:runtime.output_dir}`` (the run dir) and ``${hydra:runtime.cwd}`` resolve.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = os.getcwd()
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def quick_help(script: str | os.PathLike, config_name: str, argv: Sequence[str] | None = None) -> bool:
    """``python <script> --help``: the config groups and the composed config, as Hydra's help shows them, in under a
    second. Hydra's own composes every group (its plugins' too) to list the options, ~2 s on 2 cores (issue 13's
    start-up budget is 1.5 s); the options here are the files of the config folder. Returns whether it printed help
    (``--hydra-help`` is still Hydra's)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(arg in ("--help", "-h") for arg in args):
        return False
    config_dir = Path(script).resolve().parent / "configs"
    groups = {
        d.relative_to(config_dir).as_posix(): sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(config_dir.rglob("*"))
        if d.is_dir() and any(d.glob("*.yaml"))
    }
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[a for a in args if not a.startswith("-")])
    name = Path(script).name
    doc = ast.get_docstring(ast.parse(Path(script).read_text())) or ""
    lines = [
        f"{name}: {doc.splitlines()[0] if doc else ''}",
        "",
        "Choose an option of a group with group=option, override any key with key=value (python "
        f"{name} --cfg job prints the composed config; --hydra-help lists Hydra's own flags).",
        "",
        "== Config groups ==",
        *(f"{group}: {', '.join(options)}" for group, options in groups.items() if not group.startswith("hydra")),
        *(
            f"{group}: {', '.join(options)} (and Hydra's own, --hydra-help)"
            for group, options in groups.items()
            if group.startswith("hydra/")
        ),
        "",
        "== Config ==",
        OmegaConf.to_yaml(cfg),
    ]
    print("\n".join(lines))
    return True


def _user_error(err: BaseException | None) -> UserError | None:
    while err is not None:
        if isinstance(err, UserError):
            return err
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn mistakes a user can fix into one line on stderr and exit code 2, instead of a traceback.

    Hydra wraps exceptions raised inside ``instantiate`` in ``InstantiationException``; we unwrap to find ours.
    A run stopped by a signal (``RunInterrupted``) also gets one line, and its own non-zero exit code; so does Ctrl-C
    anywhere else (130, as a shell reports a process SIGINT ended), Lightning's ``exit(1)`` for it included.
    """
    try:
        yield
    except RunInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except (KeyboardInterrupt, SystemExit) as err:
        if not is_keyboard_interrupt(err):
            raise
        print("interrupted: received SIGINT (Ctrl-C); stopped before the end", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except (UserError, InstantiationException) as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


class RunDirCheck(Callback):
    """Create the run (or sweep) dir before Hydra does, so a file in its place, or a place that cannot be written, is
    one line naming ``hydra.run.dir`` and exit code 2 (Hydra's own ``mkdir`` fails with a traceback, before any
    entry script's ``user_errors`` runs). Registered in configs/hydra/default.yaml for every entry script."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _make_dir(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _make_dir(config.hydra.sweep.dir, "hydra.sweep.dir")


def _make_dir(path: str, key: str) -> None:
    with user_errors(), writing(path, key):
        Path(path).mkdir(parents=True, exist_ok=True)


def record_hydra_config(cfg: DictConfig, output_dir: str | os.PathLike) -> Path:
    """Write ``<run dir>/.hydra/{config,hydra,overrides}.yaml``, as Hydra would, but only once this run holds the run
    dir's lock (``train.yaml`` sets ``hydra.output_subdir: null``): a second run started in a busy dir is refused
    without first overwriting the running one's record."""
    out = Path(output_dir) / ".hydra"
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    hydra_cfg = HydraConfig.get()
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(task))
    atomic_write_text(out / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}))
    atomic_write_text(out / "overrides.yaml", OmegaConf.to_yaml(list(hydra_cfg.overrides.task)))
    return out


def save_json(data: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Atomic write: a killed run never leaves half a metrics file."""
    return atomic_write_text(path, json.dumps(dict(data), indent=2, sort_keys=True))


def write_csv(path: str | os.PathLike, rows: Iterable[Sequence[object]]) -> Path:
    """Atomic, like ``save_json``: a killed run never leaves half a CSV."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return atomic_write_text(path, buf.getvalue(), newline="")


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (``callbacks``, ``logger``); None entries are switched off."""
    return [instantiate(c) for c in (group or {}).values() if c is not None]
