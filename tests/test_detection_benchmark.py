"""benchmarks/detection.py: every detector on the same noisy labels, cached training runs."""

import json
import math

import pytest

from benchmarks import detection

# The module's trained runs are shared by its tests: one pytest-xdist worker runs them all.
pytestmark = pytest.mark.xdist_group('detection_benchmark')

QUICK = ['--quick', '--cv-folds', '2']


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp('cache'))
  record = detection.main([*QUICK, '--cache', cache])
  return record, cache


def test_quick_run_scores_every_detector_on_both_noise_kinds(quick):
  record, _ = quick
  cells = {'digits/config/config/uniform:0.4', 'digits/config/config/pair_flip:0.4'}
  assert set(record['results']) == cells
  for cell, by_detector in record['results'].items():
    expected = {f'{s}+{r}' for s in detection.STATISTICS for r in ('gmm', 'class_gmm')}
    expected |= {'aum+sign', detection.DEFAULT}
    assert set(by_detector) == expected | set(detection.PEERS), cell
    for name, row in by_detector.items():
      assert 0.5 < row['auroc'] <= 1.0, (cell, name)  # Better than chance after 3 epochs.
      assert all(math.isfinite(v) for v in row.values()), (cell, name)
  assert record['default_detector'] == detection.DEFAULT
  for name, row in record['matrix'].items():
    assert row['worst_f1'] <= row['mean_f1'] and row['worst_auroc'] <= row['mean_auroc'], name
    assert row['worst_f1_cell'] in cells
  for verdict in record['targets'].values():
    assert verdict['best_peer'] in detection.PEERS
    assert verdict['target_met'] == (not verdict['missed'])
    assert 1.0 < verdict['time_vs_one_run'] < 4.0  # Round 2 is one more run of the same size.


def test_second_run_reuses_the_cache_and_ends_with_json(quick, monkeypatch, capsys):
  record, cache = quick

  def no_training(*args, **kwargs):
    raise AssertionError('trained again instead of reading the cache')

  monkeypatch.setattr(detection, 'collect', no_training)
  again = detection.main([*QUICK, '--cache', cache])
  assert again['results'] == record['results']
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(last)['targets'] == record['targets']


def test_without_cleanlab_its_row_is_skipped_with_a_message(quick, monkeypatch, capsys):
  _, cache = quick
  monkeypatch.setattr(detection, 'cleanlab_available', lambda: False)
  monkeypatch.setattr(detection, 'collect', lambda *a: pytest.fail('trained again'))
  record = detection.main([*QUICK, '--cache', cache])  # The cached runs serve it.
  assert 'cleanlab is not installed' in capsys.readouterr().out
  assert all('cleanlab' not in by_detector for by_detector in record['results'].values())


def test_an_unknown_recipe_is_refused(capsys):
  with pytest.raises(SystemExit):
    detection.parse_args(['--recipes', 'npz,fast'])
  assert "unknown recipe 'fast'" in capsys.readouterr().err
