"""benchmarks/detection.py: every detector on the same noisy labels, cached training runs."""

import json
import math

import pytest

from benchmarks import detection


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp('cache'))
  record = detection.main(['--quick', '--cv-folds', '2', '--cache', cache])
  return record, cache


def test_quick_run_scores_every_detector_on_both_noise_kinds(quick, capsys):
  record, _ = quick
  assert set(record['results']) == {'uniform:0.4', 'pair_flip:0.4'}
  for setting, by_detector in record['results'].items():
    expected = {f'{s}+{r}' for s in detection.STATISTICS for r in ('gmm', 'class_gmm')}
    expected.add('aum+sign')
    assert set(by_detector) == expected | set(detection.PEERS), setting
    for name, row in by_detector.items():
      assert 0.5 < row['auroc'] <= 1.0, (setting, name)  # Better than chance after 3 epochs.
      assert all(math.isfinite(v) for v in row.values()), (setting, name)
  assert record['default_detector'] == 'aum+sign'
  for verdict in record['headline'].values():
    assert verdict['best_peer'] in detection.PEERS
    assert verdict['f1_gain'] == pytest.approx(verdict['f1'] - verdict['peer_f1'], abs=2e-3)


def test_second_run_reuses_the_cache_and_ends_with_json(quick, monkeypatch, capsys):
  record, cache = quick

  def no_training(*args, **kwargs):
    raise AssertionError('trained again instead of reading the cache')

  monkeypatch.setattr(detection, 'collect', no_training)
  again = detection.main(['--quick', '--cv-folds', '2', '--cache', cache])
  assert again['results'] == record['results']
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(last)['headline'] == record['headline']


def test_without_cleanlab_its_row_is_skipped_with_a_message(quick, monkeypatch, capsys):
  _, cache = quick
  monkeypatch.setattr(detection, 'cleanlab_available', lambda: False)
  record = detection.main(['--quick', '--cache', cache])
  assert 'cleanlab is not installed' in capsys.readouterr().out
  assert all('cleanlab' not in by_detector for by_detector in record['results'].values())
