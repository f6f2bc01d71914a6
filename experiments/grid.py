"""Experiment grids: the paper's Table 1 and Figures 5 and 7 as many resumable pipeline runs.

  python -m experiments.grid table --config configs/digits.py --grid_dir DIR \
    --config.retrain.epochs=40 --methods=aul,standard --noise=uniform:0.4 --trials=3

Modes: `table` (test error of methods x noise settings x trials, Table 1), `detection`
(detection-only runs over noise settings x trials, Figure 7) and `consistency` (AUL
correlations between architectures and seeds on the same noisy labels, Figure 5). Every run
writes into DIR/runs/<run_name>/ and its result into DIR/results/<run_name>.json; a run whose
result exists is skipped, so an interrupted grid resumes, and failed runs are retried.
Aggregation is a pure function of the result dicts. See docs/experiments.md.
"""

import copy
import csv
import dataclasses
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags, logging
from matplotlib.figure import Figure
from ml_collections import config_flags
from scipy import stats

from aul_jax import checkpointing, figures, models, noise, outputs, pipeline, retrain
from aul_jax import config as config_lib
from aul_jax.errors import Preempted, UserInputError
from aul_jax.progress import Log

MODES = ('table', 'detection', 'consistency')
TABLE_NOISE = ('uniform:0.2', 'uniform:0.4', 'uniform:0.6', 'uniform:0.8', 'pair_flip:0.4')
DETECTION_NOISE = tuple(f'uniform:{r / 10:g}' for r in range(1, 10)) + tuple(
  f'pair_flip:{r / 10:g}' for r in range(1, 5)
)
DETECTION_METRICS = ('noise_estimate', 'precision', 'recall', 'f1', 'auroc')
FAILED = 'failed'
MISSING = '—'
_SAFE_NAME = re.compile(r'[A-Za-z0-9._-]+')
_MODE_FLAGS = {
  'table': ('methods', 'noise', 'trials'),
  'detection': ('noise', 'trials'),
  'consistency': ('models', 'seeds', 'seeds_as_trials'),
}

RunFn = Callable[..., dict]  # pipeline.run's signature: (config, workdir, log=...) -> summary.


@dataclasses.dataclass(frozen=True)
class NoiseSetting:
  kind: str
  rate: float

  @property
  def spec(self) -> str:
    """As written on the command line and in table headers, e.g. 'uniform:0.4'."""
    return f'{self.kind}:{self.rate!r}'

  @property
  def slug(self) -> str:
    """As written in run names, e.g. 'uniform0.4'."""
    return f'{self.kind}{self.rate!r}'


@dataclasses.dataclass(frozen=True)
class Run:
  name: str  # Deterministic and filesystem-safe: the run's directory and result file name.
  overrides: tuple[tuple[str, Any], ...]  # (dotted config field, value), applied in order.


# ------------------------------------------------------------------------ flag parsing


def _nonempty_unique(values: Sequence[str], flag: str) -> list[str]:
  """Stripped values; raises on an empty list or a repeated value."""
  values = [v.strip() for v in values]
  if not values or not all(values):
    raise UserInputError(f'--{flag}={",".join(values)}: expected a comma-separated list')
  repeated = sorted({v for v in values if values.count(v) > 1})
  if repeated:
    raise UserInputError(f'--{flag}: {", ".join(repeated)} given more than once')
  return values


def _known_names(values: Sequence[str], flag: str, what: str, known) -> tuple[str, ...]:
  """Distinct names from `known`, in the given order; an unknown one is a UserInputError."""
  names = _nonempty_unique(values, flag)
  for name in names:
    if name not in known:
      raise UserInputError(f"--{flag}: unknown {what} '{name}'; known: {', '.join(known)}")
  return tuple(names)


def parse_methods(values: Sequence[str]) -> tuple[str, ...]:
  """Methods in the given order (the table's row order), each one of retrain.METHODS."""
  return _known_names(values, 'methods', 'method', retrain.METHODS)


def parse_noise_setting(spec: str) -> NoiseSetting:
  """'KIND:RATE' -> NoiseSetting, with kind and rate checked as config.noise would be."""
  kind, sep, rate_text = spec.strip().partition(':')
  try:
    rate = float(rate_text)
  except ValueError:
    rate = None
  if not sep or rate is None:
    raise UserInputError(
      f"--noise: '{spec}' is not KIND:RATE with a numeric RATE, e.g. uniform:0.4"
    )
  try:
    noise.transition_matrix(kind, rate, 2)
  except UserInputError as e:
    raise UserInputError(f"--noise: '{spec}': {e}") from None
  return NoiseSetting(kind, rate)


def parse_noise(values: Sequence[str]) -> tuple[NoiseSetting, ...]:
  """Noise settings in the given order (the table's column order), no two the same."""
  settings = [parse_noise_setting(v) for v in _nonempty_unique(values, 'noise')]
  specs = [s.spec for s in settings]
  repeated = sorted({s for s in specs if specs.count(s) > 1})
  if repeated:
    raise UserInputError(f'--noise: {", ".join(repeated)} given more than once')
  return tuple(settings)


def check_trials(trials: int) -> int:
  """Trials are numbered 0..trials-1; at least one is needed for a mean."""
  if trials < 1:
    raise UserInputError(f'--trials={trials}; expected an integer >= 1')
  return trials


def parse_models(values: Sequence[str]) -> tuple[str, ...]:
  """Architectures in the given order, each a key of the model zoo."""
  return _known_names(values, 'models', 'model', models.MODELS)


def parse_seeds(values: Sequence[str]) -> tuple[int, ...]:
  """Training seeds as integers (they name runs, so no signs or spaces)."""
  seeds = _nonempty_unique(values, 'seeds')
  if not all(re.fullmatch(r'\d+', s) for s in seeds):
    raise UserInputError(f'--seeds={",".join(seeds)}; expected non-negative integers')
  return tuple(int(s) for s in seeds)


# --------------------------------------------------------------------------- the runs


def _run(name: str, overrides: Mapping[str, Any]) -> Run:
  if not _SAFE_NAME.fullmatch(name):
    raise UserInputError(f'run name {name!r} is not filesystem-safe')
  return Run(name, tuple(overrides.items()))


def _trial_overrides(setting, trial: int) -> dict:
  """The noise setting, with trial t's noise seed and training seed (both t)."""
  return {
    'noise.kind': setting.kind,
    'noise.rate': setting.rate,
    'noise.seed': trial,
    'seed': trial,
  }


def table_runs(methods, settings, trials: int) -> list[Run]:
  """Methods x noise settings x trials; trial t sets noise.seed = seed = t."""
  return [
    _run(f'{method}-{setting.slug}-trial{t}', {'method': method, **_trial_overrides(setting, t)})
    for setting in settings
    for t in range(trials)
    for method in methods
  ]


def detection_runs(settings, trials: int) -> list[Run]:
  """Detection only (method aul, no retraining) over noise settings x trials."""
  return [
    _run(
      f'{setting.slug}-trial{t}',
      {'method': 'aul', 'retrain.epochs': 0, **_trial_overrides(setting, t)},
    )
    for setting in settings
    for t in range(trials)
  ]


def consistency_runs(model_names, seeds, seeds_as_trials: bool = False) -> list[Run]:
  """Detection only on the config's noisy labels, per architecture and training seed; with
  `seeds_as_trials`, one run per architecture that trains its seeds as the trials of one
  program (`config.trials`: trial r trains with seed + r, so the seeds must be consecutive)."""
  detection_only = {'method': 'aul', 'retrain.epochs': 0}
  if not seeds_as_trials:
    return [
      _run(f'{name}-seed{seed}', {**detection_only, 'model.name': name, 'seed': seed})
      for name in model_names
      for seed in seeds
    ]
  first = min(seeds)
  if sorted(seeds) != list(range(first, first + len(seeds))):
    raise UserInputError(
      f'--seeds={",".join(map(str, seeds))} with --seeds_as_trials: expected consecutive '
      'seeds (trial r trains with seed + r), e.g. --seeds=0,1,2'
    )
  last = first + len(seeds) - 1
  return [
    _run(
      f'{name}-seeds{first}-{last}',
      {**detection_only, 'model.name': name, 'seed': first, 'trials': len(seeds)},
    )
    for name in model_names
  ]


def run_config(base: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  """A copy of `base` with the run's overrides set."""
  config = copy.deepcopy(base)
  for field, value in run.overrides:
    *sections, key = field.split('.')
    node = config
    for section in sections:
      node = node[section]
    node[key] = value
  return config


def _as_json(value) -> Any:
  """`value` as it reads back from a result file (tuples become lists, NaN null)."""
  return json.loads(outputs.summary_json(value))


def _result_path(grid_dir: str, run: Run) -> str:
  return os.path.join(grid_dir, 'results', f'{run.name}.json')


def load_result(grid_dir: str, run: Run) -> dict | None:
  """The run's result dict, or None when it has not finished."""
  path = _result_path(grid_dir, run)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserInputError(f'cannot read {path}: {e}; delete it to rerun the run') from None


def _check_resumable(result: dict | None, config, path: str) -> None:
  """A finished result made with another config would silently mix two grids: refuse it."""
  if result is None or 'error' in result:
    return
  differences = checkpointing.config_differences(
    result.get('config', {}), checkpointing.config_json(config)
  )
  if differences:
    raise UserInputError(
      f'{path} was made with a different config ({"; ".join(differences[:3])}); '
      'use a new --grid_dir, or delete the results to rerun them'
    )


def _execute(run: Run, config, grid_dir: str, run_fn: RunFn, log: Log) -> dict:
  """Runs one pipeline; a failure becomes {'error': ...} so that the grid goes on."""
  result = {'run': run.name, 'overrides': dict(run.overrides), 'config': config.to_dict()}
  try:
    summary = run_fn(config, os.path.join(grid_dir, 'runs', run.name), log=log)
  except (UserInputError, Preempted):
    raise  # Bad config or data fails every run alike; a signal stops the whole grid.
  except Exception as e:  # A diverged or crashed run must not stop the grid.
    logging.exception('run %s failed', run.name)
    return {**result, 'error': f'{type(e).__name__}: {e}'}
  return {**result, 'summary': {k: v for k, v in summary.items() if k != 'config'}}


def run_grid(
  runs: Sequence[Run],
  base: ml_collections.ConfigDict,
  grid_dir: str,
  *,
  run_fn: RunFn = pipeline.run,
  log: Log = logging.info,
) -> list[dict]:
  """Runs every run without a finished result in grid_dir; returns all results, in order.

  Every config is validated, and every existing result checked against it, before any run
  starts. A result is written as soon as its run ends, so an interrupted grid resumes.
  """
  config_lib.check_workdir(grid_dir)
  configs = [run_config(base, run) for run in runs]
  previous = []
  for run, config in zip(runs, configs, strict=True):
    pipeline.check_config(config, os.path.join(grid_dir, 'runs', run.name))
    previous.append(load_result(grid_dir, run))
    _check_resumable(previous[-1], config, _result_path(grid_dir, run))
  results = []
  for i, (run, config, result) in enumerate(zip(runs, configs, previous, strict=True)):
    progress = f'[{i + 1}/{len(runs)}] {run.name}'
    if result is not None and 'error' not in result:
      log(f'{progress}: skipped, {_result_path(grid_dir, run)} exists')
    else:
      log(f'{progress}: ' + ('retrying after: ' + result['error'] if result else 'running'))
      result = _execute(run, config, grid_dir, run_fn, log)
      outputs.write_files(
        os.path.join(grid_dir, 'results'), {f'{run.name}.json': outputs.summary_json(result)}
      )
    results.append(_as_json(result))
  return results


def failures(results: Sequence[dict]) -> list[str]:
  """'run: error' for every failed run."""
  return [f'{r["run"]}: {r["error"]}' for r in results if 'error' in r]


# ------------------------------------------------------------------ text and tables


def mean_std(values, digits: int) -> str:
  """'mean ± std' with the population std (ddof=0); the paper does not say which it uses."""
  values = np.asarray(values, np.float64)
  return f'{values.mean():.{digits}f} ± {values.std(ddof=0):.{digits}f}'


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A GitHub-flavoured Markdown table."""
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """CSV with a header row; floats as Python prints them."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(header)
  writer.writerows(rows)
  return buffer.getvalue()


def _setting_of(result: dict) -> NoiseSetting:
  overrides = result['overrides']
  return NoiseSetting(overrides['noise.kind'], float(overrides['noise.rate']))


def _cell_results(results, setting: NoiseSetting, method: str | None = None) -> list[dict]:
  return [
    r
    for r in results
    if _setting_of(r) == setting and (method is None or r['overrides']['method'] == method)
  ]


def _error_cell(cell: Sequence[dict]) -> str:
  """Test error in % over the cell's trials; 'failed' if any trial failed, '—' if none ran."""
  if any('error' in r for r in cell):
    return FAILED
  errors = [r['summary'].get('test_error') for r in cell]
  errors = [100 * e for e in errors if e is not None]
  return mean_std(errors, digits=1) if errors else MISSING


def test_error_table(results, methods, settings) -> tuple[list[str], list[list[str]]]:
  """Table 1's layout: a row per method, a column per noise setting, test error in %."""
  header = ['method', *(s.spec for s in settings)]
  rows = [[m, *(_error_cell(_cell_results(results, s, m)) for s in settings)] for m in methods]
  return header, rows


def table_files(results, methods, settings) -> dict[str, str]:
  """table.md (with its caption) and table.csv (the same cells)."""
  header, rows = test_error_table(results, methods, settings)
  caption = (
    'Test error (%) after retraining, mean ± std over trials (population std, ddof=0); '
    f"'{FAILED}': a trial failed, '{MISSING}': no result.\n\n"
  )
  return {'table.md': caption + markdown_table(header, rows), 'table.csv': csv_text(header, rows)}


def _metric(results: Sequence[dict], key: str) -> np.ndarray:
  values = [r['summary'].get(key) for r in results]
  return np.array([np.nan if v is None else v for v in values], np.float64)


def detection_stats(results, settings) -> list[dict]:
  """Per noise setting: trials, failures, true rate and each metric's mean and std (ddof=0).

  A setting with a failed trial (or no trial) has NaN statistics.
  """
  rows = []
  for setting in settings:
    cell = _cell_results(results, setting)
    done = [r for r in cell if 'error' not in r]
    row = {'noise': setting.spec, 'kind': setting.kind, 'rate': setting.rate}
    row.update({'trials': len(done), 'failed': len(cell) - len(done)})
    usable = done if done and len(done) == len(cell) else []
    row['true_noise_rate'] = (
      float(_metric(usable, 'true_noise_rate').mean()) if usable else math.nan
    )
    for key in DETECTION_METRICS:
      values = _metric(usable, key)
      row[f'{key}_mean'] = float(values.mean()) if usable else math.nan
      row[f'{key}_std'] = float(values.std(ddof=0)) if usable else math.nan
    rows.append(row)
  return rows


def _detection_cells(row: dict) -> list[str]:
  if row['failed']:
    return [FAILED] * (1 + len(DETECTION_METRICS))
  if not row['trials']:
    return [MISSING] * (1 + len(DETECTION_METRICS))
  cells = [f'{row["true_noise_rate"]:.3f}']
  return cells + [f'{row[k + "_mean"]:.3f} ± {row[k + "_std"]:.3f}' for k in DETECTION_METRICS]


def detection_markdown(rows: Sequence[dict]) -> str:
  header = ['noise', 'trials', 'true rate', 'noise estimate', 'precision', 'recall', 'F1', 'AUROC']
  body = [[r['noise'], str(r['trials']), *_detection_cells(r)] for r in rows]
  caption = 'Detection only (AUL + mixture), mean ± std over trials (population std, ddof=0).\n\n'
  return caption + markdown_table(header, body)


def detection_figure(rows: Sequence[dict]) -> bytes:
  """Figure 7's content: estimated noise, precision and recall against the true noise rate."""
  fig = Figure(figsize=(15, 4.5), layout='constrained')
  axes = fig.subplots(1, 3)
  panels = (('noise_estimate', 'estimated noise'), ('precision', 'precision'), ('recall', 'recall'))
  kinds = list(dict.fromkeys(r['kind'] for r in rows))
  for ax, (key, ylabel) in zip(axes, panels, strict=True):
    for i, kind in enumerate(kinds):
      ok = [r for r in rows if r['kind'] == kind and r['trials'] and not r['failed']]
      ax.errorbar(
        [r['true_noise_rate'] for r in ok],
        [r[f'{key}_mean'] for r in ok],
        yerr=[r[f'{key}_std'] for r in ok],
        marker='o',
        capsize=3,
        color=f'C{i}',
        label=kind,
      )
    ax.set(xlabel='true noise rate', ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
  axes[0].plot([0, 1], [0, 1], color='0.5', ls='--', lw=1, label='truth')
  axes[0].set_title('Noise estimate')
  axes[1].set_title('Precision of flagged examples')
  axes[2].set_title('Recall of mislabeled examples')
  for ax in axes:
    ax.legend(fontsize=9)
  return figures.png(fig)


def detection_files(results, settings) -> dict[str, str | bytes]:
  """detection.md, detection.csv (the statistics as numbers) and detection.png."""
  rows = detection_stats(results, settings)
  header = list(rows[0])
  return {
    'detection.md': detection_markdown(rows),
    'detection.csv': csv_text(header, [[r[k] for k in header] for r in rows]),
    'detection.png': detection_figure(rows),
  }


def correlations(aul_RxN: np.ndarray) -> dict[str, np.ndarray]:
  """Pearson and Spearman correlation (R, R) between the AUL of R runs over N examples."""
  aul_RxN = np.asarray(aul_RxN, np.float64)
  ranks_RxN = stats.rankdata(aul_RxN, axis=1)  # Spearman is Pearson of (average) ranks.
  return {
    'pearson': np.atleast_2d(np.corrcoef(aul_RxN)),
    'spearman': np.atleast_2d(np.corrcoef(ranks_RxN)),
  }


def _read_scores(grid_dir: str, run: str, name: str, columns: tuple[str, ...]) -> np.ndarray:
  path = os.path.join(grid_dir, 'runs', run, name)
  if not os.path.exists(path):
    raise UserInputError(f'{path} is missing; delete results/{run}.json to rerun it')
  return np.genfromtxt(path, delimiter=',', names=True, usecols=columns)


def read_aul(grid_dir: str, results: Sequence[dict]) -> tuple[list[str], np.ndarray]:
  """Network names and their AUL (R, N) from the finished runs' scores.csv, whose labels
  must agree; a run of several trials gives each trial's, from trials/scores_trial{r}.csv,
  named by the trial's seed."""
  names, labels, aul = [], [], []
  for result in results:
    if 'error' in result:
      continue
    run, trials = result['run'], result['config'].get('trials', 1)
    scores = _read_scores(grid_dir, run, 'scores.csv', ('label', 'aul'))
    labels.append(scores['label'])
    if trials == 1:
      names.append(run)
      aul.append(scores['aul'])
      continue
    model, seed = result['config']['model']['name'], result['config']['seed']
    for r in range(trials):
      names.append(f'{model}-seed{seed + r}')
      aul.append(_read_scores(grid_dir, run, f'trials/scores_trial{r}.csv', ('aul',))['aul'])
  if any(len(y) != len(labels[0]) or np.any(y != labels[0]) for y in labels):
    raise UserInputError(f'the runs in {grid_dir} were trained on different labels')
  return names, np.array(aul).reshape(len(names), -1)


def _off_diagonal_mean(matrix_RxR: np.ndarray) -> float:
  mask = ~np.eye(len(matrix_RxR), dtype=bool)
  return float(matrix_RxR[mask].mean()) if mask.any() else math.nan


def consistency_markdown(names: Sequence[str], matrices: Mapping[str, np.ndarray]) -> str:
  parts = ['Correlation of the AUL between runs on the same noisy labels (Figure 5, left).\n']
  for measure, matrix in matrices.items():
    rows = [[n, *(f'{v:.3f}' for v in row)] for n, row in zip(names, matrix, strict=True)]
    parts.append(
      f'\n{measure.capitalize()} (mean off-diagonal {_off_diagonal_mean(matrix):.3f}):\n\n'
      + markdown_table(['run', *names], rows)
    )
  return ''.join(parts)


def consistency_figure(names: Sequence[str], matrices: Mapping[str, np.ndarray]) -> bytes:
  """Figure 5 (left)-style heatmaps of the correlation matrices, values written in."""
  size = 2.5 + 0.6 * len(names)
  fig = Figure(figsize=(2 * size + 1, size), layout='constrained')
  axes = fig.subplots(1, len(matrices))
  low = min(float(np.nanmin(m)) for m in matrices.values())
  vmin = min(low, 0.99)
  for ax, (measure, matrix) in zip(axes, matrices.items(), strict=True):
    image = ax.imshow(matrix, vmin=vmin, vmax=1.0, cmap='viridis')
    ax.set_xticks(range(len(names)), names, rotation=45, ha='right')
    ax.set_yticks(range(len(names)), names)
    ax.set_title(f'AUL: {measure.capitalize()} correlation')
    for (i, j), value in np.ndenumerate(matrix):
      dark = value < (vmin + 1.0) / 2  # White text on viridis' dark end, black on its light end.
      ax.text(
        j, i, f'{value:.2f}', ha='center', va='center', fontsize=8, color='w' if dark else 'k'
      )
    fig.colorbar(image, ax=ax, shrink=0.8)
  return figures.png(fig)


def consistency_files(names: Sequence[str], aul_RxN: np.ndarray) -> dict[str, str | bytes]:
  """consistency.md, .csv (one row per measure and run) and .png; empty with < 2 runs."""
  if len(names) < 2:
    return {}
  matrices = correlations(aul_RxN)
  rows = [
    [measure, name, *row.tolist()]
    for measure, matrix in matrices.items()
    for name, row in zip(names, matrix, strict=True)
  ]
  return {
    'consistency.md': consistency_markdown(names, matrices),
    'consistency.csv': csv_text(['measure', 'run', *names], rows),
    'consistency.png': consistency_figure(names, matrices),
  }


# ------------------------------------------------------------------------- the modes


def table(config, grid_dir, *, methods, settings, trials, run_fn=pipeline.run, log=logging.info):
  """Table 1: runs the grid and writes table.md and table.csv; returns (results, files)."""
  if config.retrain.epochs <= 0:
    raise UserInputError(
      'table mode compares test errors after retraining: set --config.retrain.epochs > 0 '
      '(twice aul.epochs, as in the paper)'
    )
  runs = table_runs(methods, settings, trials)
  results = run_grid(runs, config, grid_dir, run_fn=run_fn, log=log)
  files = table_files(results, methods, settings)
  outputs.write_files(grid_dir, files)
  return results, files


def detection(config, grid_dir, *, settings, trials, run_fn=pipeline.run, log=logging.info):
  """Figure 7: runs the grid and writes detection.md, .csv and .png."""
  results = run_grid(detection_runs(settings, trials), config, grid_dir, run_fn=run_fn, log=log)
  files = detection_files(results, settings)
  outputs.write_files(grid_dir, files)
  return results, files


def consistency(
  config,
  grid_dir,
  *,
  model_names,
  seeds,
  seeds_as_trials=False,
  run_fn=pipeline.run,
  log=logging.info,
):
  """Figure 5 (left): runs the grid and writes consistency.md, .csv and .png."""
  if len(model_names) * len(seeds) < 2:
    raise UserInputError('consistency needs at least two runs: give more --models or --seeds')
  runs = consistency_runs(model_names, seeds, seeds_as_trials)
  results = run_grid(runs, config, grid_dir, run_fn=run_fn, log=log)
  files = consistency_files(*read_aul(grid_dir, results))
  outputs.write_files(grid_dir, files)
  return results, files


# ---------------------------------------------------------------------- command line


def _define_flags() -> None:
  """Only when run as a program, so that importing this module defines no global flags."""
  config_flags.DEFINE_config_file('config', None, 'Path to a config file.', lock_config=True)
  flags.DEFINE_string('grid_dir', None, 'Directory for runs/, results/ and the tables.')
  flags.DEFINE_list('methods', list(retrain.METHODS), 'table: methods, in row order.')
  flags.DEFINE_list('noise', None, 'table, detection: KIND:RATE settings, in column order.')
  flags.DEFINE_integer('trials', 3, 'table, detection: trial t sets noise.seed = seed = t.')
  flags.DEFINE_list('models', ['lenet', 'mlp'], 'consistency: architectures.')
  flags.DEFINE_list('seeds', ['0', '1'], 'consistency: training seeds.')
  flags.DEFINE_bool(
    'seeds_as_trials',
    False,
    "consistency: train each model's (consecutive) seeds as the trials of one program.",
  )
  flags.mark_flags_as_required(['config', 'grid_dir'])


def _parse_mode(argv: list[str]) -> str:
  if len(argv) != 2 or argv[1] not in MODES:
    got = ' '.join(argv[1:]) or 'none'
    raise UserInputError(f'expected one mode out of {", ".join(MODES)}; got {got}')
  mode = argv[1]
  other_flags = {name for names in _MODE_FLAGS.values() for name in names} - {*_MODE_FLAGS[mode]}
  for name in sorted(other_flags):
    if flags.FLAGS[name].present:
      raise UserInputError(f'--{name} is not used in {mode} mode')
  return mode


def _run_mode(mode: str) -> tuple[list[dict], dict]:
  """Parses the mode's flags (before any work) and runs it."""
  f = flags.FLAGS
  if mode == 'consistency':
    model_names, seeds = parse_models(f.models), parse_seeds(f.seeds)
    return consistency(
      f.config,
      f.grid_dir,
      model_names=model_names,
      seeds=seeds,
      seeds_as_trials=f.seeds_as_trials,
    )
  default_noise = TABLE_NOISE if mode == 'table' else DETECTION_NOISE
  settings = parse_noise(f.noise if f.noise is not None else default_noise)
  trials = check_trials(f.trials)
  if mode == 'table':
    methods = parse_methods(f.methods)
    return table(f.config, f.grid_dir, methods=methods, settings=settings, trials=trials)
  return detection(f.config, f.grid_dir, settings=settings, trials=trials)


def main(argv: list[str]) -> int:
  try:
    mode = _parse_mode(argv)
    results, files = _run_mode(mode)
  except UserInputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except Preempted as e:
    print(f'{e}; finished runs are kept', file=sys.stderr)
    return 75  # EX_TEMPFAIL, as launch.py: try again later.
  print(files.get(f'{mode}.md', 'fewer than two finished runs: no correlations\n'))
  failed = failures(results)
  print(f'{len(results)} runs, {len(failed)} failed; outputs in {flags.FLAGS.grid_dir}')
  if failed:
    print('failed runs (the same command retries them):', *failed, sep='\n  ', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  _define_flags()
  logging.set_verbosity(logging.INFO)
  app.run(main)
