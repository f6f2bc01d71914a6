"""Multi-host start-up: `jax.distributed.initialize` when the config or environment asks.

Explicit: `distributed.coordinator_address`, `num_processes` and `process_id` in the config.
Automatic (`distributed.auto_detect`): under SLURM with more than one task, or on a
multi-host Cloud TPU, JAX's own cluster detection fills in all three.
"""

import os

import jax
import ml_collections

from aul_jax.errors import UserInputError


def _cluster_detected(environ) -> bool:
  slurm_tasks = int(environ.get('SLURM_NTASKS', '1') or 1)
  tpu_hosts = environ.get('TPU_WORKER_HOSTNAMES', '')
  return slurm_tasks > 1 or ',' in tpu_hosts


def wanted(distributed: ml_collections.ConfigDict, environ=os.environ) -> bool:
  """Whether this run spans several processes."""
  return bool(distributed.coordinator_address) or (
    distributed.auto_detect and _cluster_detected(environ)
  )


def validate(distributed: ml_collections.ConfigDict) -> None:
  if not distributed.coordinator_address:
    return
  if distributed.num_processes < 1 or not 0 <= distributed.process_id < distributed.num_processes:
    raise UserInputError(
      f'distributed.coordinator_address is set, so distributed.num_processes '
      f'({distributed.num_processes}) must be >= 1 and distributed.process_id '
      f'({distributed.process_id}) in 0..num_processes-1'
    )


def initialize(distributed: ml_collections.ConfigDict) -> None:
  """Joins the other processes of this run; call before any JAX computation."""
  validate(distributed)
  if not wanted(distributed):
    return
  # CPU processes talk through gloo; GPUs and TPUs use their own collectives.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if distributed.coordinator_address:
    jax.distributed.initialize(
      coordinator_address=distributed.coordinator_address,
      num_processes=distributed.num_processes,
      process_id=distributed.process_id,
    )
  else:
    jax.distributed.initialize()


def is_primary() -> bool:
  """Only process 0 writes outputs and logs."""
  return jax.process_index() == 0
