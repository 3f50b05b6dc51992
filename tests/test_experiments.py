"""The main job and sweeps end to end: `ddiff run` through papermill, reports, one-line errors, sweep bookkeeping."""
import csv, json, os, subprocess, sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = ['train.max_steps=30', 'train.eval_interval=15', 'train.eval_batches=2', 'train.log_interval=5',
        'eval.n_windows=16', 'experiment.judge_steps=10']

def ddiff(*args, env, check=True):
    "Run the ddiff CLI in a subprocess with `env`."
    res = subprocess.run([sys.executable, '-m', 'ddiff.cli', *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    if check: assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res

@pytest.fixture
def env(tmp_path):
    e = {**os.environ, 'DDIFF_DATA': str(tmp_path / 'data'), 'DDIFF_OUTPUTS': str(tmp_path / 'outputs'), 'OMP_NUM_THREADS': '1'}
    return e

@pytest.fixture
def tiny_quickstart(tmp_path):
    "configs/quickstart.yaml shrunk to a tiny model and data so it runs in well under a minute."
    cfg = yaml.safe_load((ROOT / 'configs/quickstart.yaml').read_text())
    cfg['data'].update(block_size=64, batch_size=8, batches_per_file=4, val_files=1, max_backlog=4, dataset='tiny-quickstart')
    cfg['model'].update(n_layer=1, n_head=2, n_embd=32)
    cfg['train'].update(device='cpu', warmup_steps=5)
    cfg['train'].pop('max_minutes', None)
    cfg['sample'].update(num_samples=2, max_new_tokens=24)
    p = tmp_path / 'tiny_quickstart.yaml'
    p.write_text(yaml.safe_dump(cfg))
    return p

@pytest.mark.slow
def test_run_twice_same_metrics(env, tiny_quickstart, tmp_path):
    ddiff('run', '--no-progress', str(tiny_quickstart), *TINY, env=env)
    run = tmp_path / 'outputs' / 'quickstart' / 'quickstart'
    for f in ('train_evaluate.ipynb', 'sample_score.ipynb', 'metrics.json', 'params.yaml', 'provenance.json',
              'report.md', 'report.html', 'samples.txt', 'loss_curves.png', 'trajectory.png'):
        assert (run / f).exists(), f
    m1 = json.loads((run / 'metrics.json').read_text())
    assert m1['status'] == 'complete' and m1['steps'] == 30 and Path(m1['checkpoint']).exists()
    assert 'sample/distinct_2' in m1 and 'final/ce_corrupted_bits' in m1
    assert yaml.safe_load((run / 'params.yaml').read_text())['train']['max_steps'] == 30
    assert json.loads((run / 'provenance.json').read_text())['git_commit'] != ''
    # a complete run is skipped; --force runs it again from scratch (fresh queue) and must give the same numbers
    ddiff('run', '--no-progress', '--force', str(tiny_quickstart), *TINY, 'experiment.name=again', env=env)
    m2 = json.loads((tmp_path / 'outputs/quickstart/again/metrics.json').read_text())
    timing = ('seconds', 'timing/', 'checkpoint', 'judge')
    same = lambda m: {k: v for k, v in m.items() if not any(t in k for t in timing)}
    assert same(m1) == same(m2)

@pytest.mark.slow
def test_bad_parameters_one_line(env, tiny_quickstart, tmp_path):
    for bad, key in ((['train.lrr=1'], "'train.lrr'"), (['train.lr=fast'], "'train.lr'"), (['sample.temprature=1'], "'sample.temprature'")):
        res = ddiff('run', str(tiny_quickstart), *bad, env=env, check=False)
        assert res.returncode == 2 and key in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = ddiff('run', str(tmp_path / 'missing.yaml'), env=env, check=False)
    assert res.returncode == 2 and 'missing.yaml' in res.stderr and 'does not exist' in res.stderr
    assert not (tmp_path / 'outputs').exists() or not any((tmp_path / 'outputs').rglob('metrics.json'))

@pytest.mark.slow
def test_sweep_records_failures_and_skips_complete(env, tiny_quickstart, tmp_path):
    sweep = tmp_path / 'sweep.yaml'
    sweep.write_text(yaml.safe_dump({
        'base': str(tiny_quickstart), 'group': 'sw', 'workers': 2,
        'overrides': ['experiment.kind=train_evaluate', *TINY[:5]],
        'grid': {'data.mixture': [[1.0, 0.0, 0.0], [0.6, 0.2, 0.2]]},
        'runs': [{'name': 'broken', 'overrides': ['train.lr=-1']}]}))
    ddiff('sweep', '--no-progress', str(sweep), env=env)
    rows = list(csv.DictReader(open(tmp_path / 'outputs/sw/results.csv')))
    status = {r['run']: r['status'] for r in rows}
    assert status == {'mixture-1.0_0.0_0.0': 'complete', 'mixture-0.6_0.2_0.2': 'complete', 'broken': 'failed'}, rows
    broken = next(r for r in rows if r['run'] == 'broken')
    assert 'train.lr=-1' in broken['error']
    assert (tmp_path / 'outputs/sw/comparison.png').exists()
    ddiff('sweep', '--no-progress', str(sweep), env=env)  # again: complete runs are skipped, the failed one is retried
    rows = list(csv.DictReader(open(tmp_path / 'outputs/sw/results.csv')))
    assert sorted(r['status'] for r in rows) == ['failed', 'skipped (complete)', 'skipped (complete)']
