"""Run outputs: exact CSV round trip, JSON without NaN, all-or-nothing writes."""

import csv
import json
import os
import tracemalloc

import numpy as np
import pytest

from aul_jax import outputs


def test_scores_csv_round_trips_floats_exactly(tmp_path):
  aul = np.random.default_rng(0).random(5) * 100
  columns = {'index': np.arange(5), 'aul': aul, 'flagged': aul > 50}
  outputs.write_run_outputs(str(tmp_path), columns, {'n_train': 5})
  with open(tmp_path / 'scores.csv') as f:
    rows = list(csv.DictReader(f))
  assert [float(r['aul']) for r in rows] == aul.tolist()
  assert [r['flagged'] for r in rows] == ['true' if a > 50 else 'false' for a in aul]
  assert [int(r['index']) for r in rows] == list(range(5))


def test_summary_json_writes_nan_as_null(tmp_path):
  outputs.write_run_outputs(
    str(tmp_path), {'index': np.arange(2)}, {'auroc': float('nan'), 'x': np.float32(1.5)}
  )
  with open(tmp_path / 'summary.json') as f:
    assert json.load(f) == {'auroc': None, 'x': 1.5, 'outputs': ['scores.csv']}


def test_history_is_written_examples_by_epochs(tmp_path):
  history_NxT = np.arange(6, dtype=np.float32).reshape(3, 2)
  outputs.write_run_outputs(str(tmp_path), {'index': np.arange(3)}, {}, history_NxT)
  np.testing.assert_array_equal(np.load(tmp_path / 'aul_history.npy'), history_NxT)


def test_summary_is_renamed_last_and_lists_the_outputs(tmp_path, monkeypatch):
  renamed = []
  replace = os.replace
  monkeypatch.setattr(
    os, 'replace', lambda a, b: (renamed.append(os.path.basename(b)), replace(a, b))
  )
  history_NxT = np.zeros((3, 2), np.float32)
  figures = {'a.png': b'png'}
  outputs.write_run_outputs(str(tmp_path), {'index': np.arange(3)}, {}, history_NxT, figures)
  assert renamed[-1] == 'summary.json' and len(renamed) == 4
  with open(tmp_path / 'summary.json') as f:
    assert json.load(f)['outputs'] == ['a.png', 'aul_history.npy', 'scores.csv']


def test_failed_write_leaves_nothing_behind(tmp_path):
  class Unwritable:
    pass

  with pytest.raises(TypeError):
    outputs.write_run_outputs(str(tmp_path), {'index': np.arange(2)}, {'bad': Unwritable()})
  assert os.listdir(tmp_path) == []


def test_csv_blocks_join_to_the_same_text_whatever_their_size():
  rng = np.random.default_rng(0)
  columns = {'id': np.array(['a', 'b,"c"', 'd'] * 4), 'aul': rng.random(12), 'k': np.arange(12)}
  texts = {''.join(outputs.csv_chunks(columns, rows_per_chunk=n)) for n in (1, 5, 12, 100)}
  assert len(texts) == 1
  text = texts.pop()
  assert text.count('\n') == 13 and text.startswith('id,aul,k\n')
  rows = list(csv.DictReader(text.splitlines()))
  assert [r['id'] for r in rows] == columns['id'].tolist()
  assert [float(r['aul']) for r in rows] == columns['aul'].tolist()
  with pytest.raises(ValueError, match='different lengths'):
    list(outputs.csv_chunks({'a': np.arange(3), 'b': np.arange(4)}))


def test_a_large_scores_csv_is_streamed_not_built_in_memory(tmp_path):
  """The old writer held every row's text at once (more than the file's size); the stream
  holds one block of rows."""
  n = 250_000
  rng = np.random.default_rng(0)
  columns = {'index': np.arange(n), **{name: rng.random(n) for name in ('aul', 'aum', 'score')}}
  history_NxT = rng.random((n, 4)).astype(np.float32)
  tracemalloc.start()
  try:
    outputs.write_run_outputs(str(tmp_path), columns, {}, history_NxT=history_NxT)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  size = os.path.getsize(tmp_path / 'scores.csv')
  assert size > 15e6
  assert peak < size / 2, (peak, size)
  with open(tmp_path / 'scores.csv') as f:
    last = f.read().splitlines()[-1].split(',')
  assert int(last[0]) == n - 1 and float(last[3]) == columns['score'][-1]
  saved = np.load(tmp_path / 'aul_history.npy')
  np.testing.assert_array_equal(saved, history_NxT)
