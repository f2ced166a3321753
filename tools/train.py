"""Trains a UniMAGE director model.

  python tools/train.py --config=configs/tiny.py --config.train.steps=100
  # multi-host: one process per host (TPU pods detect everything from the environment)
  python tools/train.py --config=... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0
"""

from absl import app, flags, logging
from ml_collections import config_flags

from unimage_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Overrides config.train.workdir.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with "
                                 "auto-detected settings (TPU pods, SLURM) even without the flags above.")
_LOCAL_DEVICES = flags.DEFINE_integer(
    "cpu_devices_per_process", None,
    "CPU only: host devices per process. One per core splits each batch's rows over the cores "
    "(data parallel: the main job's 2, BENCHMARKS.md); several per process also test multi-host.")


def _init_distributed() -> None:
  import jax
  if _LOCAL_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _LOCAL_DEVICES.value)
  if _COORDINATOR.value or _DISTRIBUTED.value:
    if jax.config.jax_platforms in (None, "", "cpu") or _LOCAL_DEVICES.value:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
    logging.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax/absl INFO lines would drown the progress bar
  _init_distributed()
  from unimage_jax.training.loop import train
  config = _CONFIG.value
  if _WORKDIR.value:
    config.train.workdir = _WORKDIR.value
  last = train(config)
  if last.pop("already_done", False):
    print(f"nothing to train: {config.train.workdir} is already at step {last['step']} (config.train.steps)")
  print({k: round(v, 5) if isinstance(v, float) else v for k, v in last.items()})


if __name__ == "__main__":
  cli.run(main)
