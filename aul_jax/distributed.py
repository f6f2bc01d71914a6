"""Multi-host start-up: `jax.distributed.initialize` when the config or environment asks.

Explicit: a coordinator address, the number of processes and this process's id.
Automatic (`auto_detect`): under SLURM with more than one task, or on a multi-host Cloud TPU,
JAX's own cluster detection fills in all three.
"""

import os

import jax


def _cluster_detected(environ) -> bool:
  slurm_tasks = int(environ.get('SLURM_NTASKS', '1') or 1)
  tpu_hosts = environ.get('TPU_WORKER_HOSTNAMES', '')
  return slurm_tasks > 1 or ',' in tpu_hosts


def wanted(coordinator_address: str, auto_detect: bool, environ=os.environ) -> bool:
  """Whether this run spans several processes."""
  return bool(coordinator_address) or (auto_detect and _cluster_detected(environ))


def initialize(
  coordinator_address: str = '', num_processes: int = 1, process_id: int = 0, auto_detect=True
) -> None:
  """Joins the other processes of this run; call before any JAX computation.

  The arguments are `config.distributed`'s, checked by `config.validate_distributed`.
  """
  if not wanted(coordinator_address, auto_detect):
    return
  # CPU processes talk through gloo; GPUs and TPUs use their own collectives.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if coordinator_address:
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  else:
    jax.distributed.initialize()


def is_primary() -> bool:
  """Only process 0 writes outputs and logs."""
  return jax.process_index() == 0
