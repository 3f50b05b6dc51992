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
    res = ddiff('run', str(tiny_quickstart), *TINY, env=env)  # with progress: the plan and the training lines stream out
    out = res.stdout
    assert 'roughly' in out and '[1/2] train_evaluate' in out and 'train: step 15/30' in out and 'judge: step 10/10' in out, out[-3000:]
    assert 'without encryption' not in res.stderr, res.stderr[-2000:]  # the kernel talks over IPC, not TCP
    run = tmp_path / 'outputs' / 'quickstart' / 'quickstart'
    for f in ('train_evaluate.ipynb', 'sample_score.ipynb', 'metrics.json', 'params.yaml', 'provenance.json',
              'report.md', 'report.html', 'samples.txt', 'loss_curves.png', 'trajectory.png'):
        assert (run / f).exists(), f
    m1 = json.loads((run / 'metrics.json').read_text())
    assert m1['status'] == 'complete' and m1['steps'] == m1['planned_steps'] == 30 and m1['stopped'] == 'max_steps'
    assert (run / m1['checkpoint']).exists() and (run / m1['last_checkpoint']).exists() and (run / m1['judge']).exists()
    assert 'sample/distinct_2' in m1 and 'final/bpc' in m1
    assert yaml.safe_load((run / 'params.yaml').read_text())['train']['max_steps'] == 30
    assert json.loads((run / 'provenance.json').read_text())['git_commit'] != ''
    # the report names checkpoint, step and unit of each figure, and no path of this machine
    report = (run / 'report.md').read_text()
    assert '| val/loss_all |' in report and '| nats/char | last.pt, step 30 |' in report, report
    assert f"| bits/char | {m1['final_checkpoint']}, step {m1['checkpoint_step']} |" in report, report
    for f in ('report.md', 'report.html', 'metrics.json', 'params.yaml'):
        assert str(tmp_path) not in (run / f).read_text(), f
    # a finished run is skipped, and says so
    res = ddiff('run', str(tiny_quickstart), *TINY, env=env)
    assert 'skipped' in res.stdout and '--force' in res.stdout and 'train_evaluate' not in res.stdout, res.stdout
    # --force runs it again from scratch (fresh queue) and must give the same numbers
    ddiff('run', '--no-progress', '--force', str(tiny_quickstart), *TINY, 'experiment.name=again', env=env)
    m2 = json.loads((tmp_path / 'outputs/quickstart/again/metrics.json').read_text())
    timing = ('seconds', 'timing/', 'checkpoint', 'judge')
    same = lambda m: {k: v for k, v in m.items() if not any(t in k for t in timing)}
    assert same(m1) == same(m2)

@pytest.mark.slow
def test_time_cap_truncation_is_reported(env, tiny_quickstart, tmp_path):
    "A run stopped by train.max_minutes says so in the terminal, metrics.json and the report, and is not 'complete'."
    res = ddiff('run', str(tiny_quickstart), *TINY, 'train.max_steps=100000', 'train.max_minutes=0.05', 'experiment.judge_steps=0', env=env)
    run = tmp_path / 'outputs' / 'quickstart' / 'quickstart'
    m = json.loads((run / 'metrics.json').read_text())
    assert m['status'] == 'truncated' and m['stopped'] == 'max_minutes' and m['steps'] < m['planned_steps'] == 100000, m
    assert 'TRUNCATED' in res.stderr and 'train.max_minutes=0.05' in res.stderr and f"{m['steps']} of 100000" in res.stderr, res.stderr[-2000:]
    assert 'run truncated' in res.stdout
    assert 'TRUNCATED' in (run / 'report.md').read_text() and 'TRUNCATED' in (run / 'report.html').read_text()
    res = ddiff('run', str(tiny_quickstart), *TINY, 'train.max_steps=100000', 'train.max_minutes=0.05', 'experiment.judge_steps=0', env=env)
    assert 'skipped' in res.stdout and 'truncated run' in res.stdout, res.stdout

@pytest.mark.slow
def test_papermill_overrides_merge_key_by_key(env, tmp_path):
    "`-y 'train: {max_steps: 6}'` changes one key of the base config's train section and keeps the others."
    out = tmp_path / 'try'
    res = subprocess.run([sys.executable, '-m', 'papermill', 'nbs/experiments/train_evaluate.ipynb', str(tmp_path / 'out.ipynb'),
                          '-p', 'run_dir', str(out), '-y', 'train: {max_steps: 6}', '--no-progress-bar'],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    base = yaml.safe_load((ROOT / 'configs/tiny_rr.yaml').read_text())['train']
    used = json.loads((out / 'train' / 'config.json').read_text())['train']
    assert used['max_steps'] == 6
    for k in ('warmup_steps', 'eval_interval', 'eval_batches', 'lr', 'log_interval'): assert used[k] == base[k], k
    m = json.loads((out / 'metrics.json').read_text())
    assert m['steps'] == 6 and (out / m['checkpoint']).exists() and not Path(m['checkpoint']).is_absolute()

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
