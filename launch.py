"""Runs the AUL pipeline: `python launch.py --config configs/digits.py --workdir DIR`.

Any config field can be overridden, e.g. `--config.noise.rate=0.2 --config.model.name=lenet`.
The code is `aul_jax.launch` (the `aul-jax` command of an installed package); this file keeps
the repo's command and the names it always had.
"""

from aul_jax.launch import define_flags, entry, main, run

__all__ = ['define_flags', 'main', 'run']

if __name__ == '__main__':
  entry()
