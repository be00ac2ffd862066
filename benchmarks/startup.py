"""How long ``train.py`` takes to start: ``--help``, ``--cfg job``, a config error, and launch -> first training step.

    PYTHONPATH=src python benchmarks/startup.py [--repeats 3] [--skip-first-step]

Each figure is the median wall time of ``--repeats`` fresh processes (``python train.py ...``, as a user runs it).
Time to the first training step is measured for the digits default and for CIFAR-10 (generated data in CIFAR's format,
seeded weights; on a CPU with ``trainer=cpu``), as the config is and with each suspect start-up cost switched off
(model summary, sanity validation, TensorBoard), so one can see what each costs before cutting it. The first step is
stamped by a callback (``FirstStep``) that exits the process at the first training batch; data preparation runs once,
untimed, before (the digits folder is written once per data dir, and scans are cached).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
STAMP = "STARTUP_STAMP_FILE"
FAKE_CIFAR = "STARTUP_FAKE_CIFAR"

if os.environ.get(FAKE_CIFAR):  # imported by Hydra (the callback below) in the measured run, before the data is read
    import torchvision.datasets.cifar

    torchvision.datasets.cifar.check_integrity = lambda *args, **kwargs: True  # our generated files have other md5s


class FirstStep:
    """A Lightning callback (duck-typed, so this module stays light) that stamps the first training batch and exits."""

    def __getattr__(self, name: str) -> Any:  # every other hook: do nothing
        if name.startswith("on_") or name in ("setup", "teardown", "state_dict", "load_state_dict"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    @property
    def state_key(self) -> str:  # what Lightning files a callback's state under
        return type(self).__qualname__

    def on_train_batch_start(self, *args: Any) -> None:
        Path(os.environ[STAMP]).write_text(repr(time.time()))
        os._exit(0)


CPU_SECONDS: list[float] = []  # user + system CPU time of each process run, beside its wall time


def wall(args: list[str], env: dict[str, str], expect: int = 0) -> float:
    """Wall seconds of ``python train.py ARGS``; its CPU seconds go to ``CPU_SECONDS`` (less sensitive to a busy machine)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    result = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != expect:
        raise RuntimeError(
            f"train.py {' '.join(args)}: exit {result.returncode}, expected {expect}: {result.stderr[-1500:]}"
        )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return time.time() - started


def first_step(args: list[str], env: dict[str, str], stamp: Path) -> float:
    stamp.unlink(missing_ok=True)
    started = time.time()
    wall([*args, "+callbacks.first_step._target_=startup.FirstStep"], {**env, STAMP: str(stamp)})
    if not stamp.exists():
        raise RuntimeError(f"train.py {' '.join(args)} ended without a training step")
    return float(stamp.read_text()) - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-first-step", action="store_true", help="only --help, --cfg job and the config error")
    args = parser.parse_args()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    rows: list[tuple[str, float, float]] = []

    def median(label: str, run: Any) -> None:
        times = [run() for _ in range(args.repeats)]
        cpu = CPU_SECONDS[-args.repeats :]
        rows.append((label, statistics.median(times), statistics.median(cpu)))
        print(
            f"{label}: median {rows[-1][1]:.2f} s wall, {rows[-1][2]:.2f} s CPU, of {[round(t, 2) for t in times]}",
            flush=True,
        )

    median("train.py --help", lambda: wall(["--help"], env))
    median("train.py --cfg job", lambda: wall(["--cfg", "job"], env))
    median("train.py data.batch_size=0 (config error)", lambda: wall(["data.batch_size=0"], env, expect=2))

    if not args.skip_first_step:
        with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
            root = Path(tmp)
            sys.path.insert(0, str(HERE))
            from train_throughput import seed_fake_weights, write_fake_cifar

            seed_fake_weights(root / "torch_home", "resnet18", "IMAGENET1K_V1")  # what digits' DEFAULT names
            seed_fake_weights(root / "torch_home", "resnet50", "IMAGENET1K_V2")
            write_fake_cifar(root / "cifar")
            run_env = {**env, "TORCH_HOME": str(root / "torch_home")}
            common = [f"paths.data_dir={root / 'data'}", f"hydra.run.dir={root / 'runs'}/${{now:%H-%M-%S-%f}}"]
            cases = {
                "digits (python train.py)": ([], run_env),
                "CIFAR-10 (experiment=cifar10 trainer=cpu, ResNet-50)": (
                    [
                        "experiment=cifar10",
                        "trainer=cpu",
                        "trainer.precision=32-true",
                        f"data.data_dir={root / 'cifar'}",
                    ],
                    {**run_env, FAKE_CIFAR: "1"},
                ),
            }
            variants = {
                "as configured": [],
                "without model summary": ["~callbacks.model_summary"],
                "without sanity validation": ["++trainer.num_sanity_val_steps=0"],
                "CSV logger instead of TensorBoard": ["logger=csv"],
            }
            for case, (overrides, case_env) in cases.items():
                first_step(
                    [*common, *overrides], case_env, root / "stamp"
                )  # untimed: writes the digits folder, scan caches
                for variant, extra in variants.items():
                    median(
                        f"{case}: launch -> first training step, {variant}",
                        lambda: first_step([*common, *overrides, *extra], case_env, root / "stamp"),
                    )
    print(f"\n{os.cpu_count()} CPUs, median of {args.repeats} fresh processes each")
    print("| start-up | wall s | CPU s (user + sys) |\n| --- | ---: | ---: |")
    for label, seconds, cpu in rows:
        print(f"| {label} | {seconds:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
