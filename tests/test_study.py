"""The strategy study end to end: the tiny study completes, a re-run reuses its rows and the cached judge, a failing row is recorded while the others finish."""
import csv, json, os, subprocess, sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ('experiment', 'data', 'model', 'train', 'eval', 'sample')

def tiny_study(extra_rows=(), keep=None) -> dict:
    "configs/study_tiny.yaml as a dict, with rows appended (and only the rows named in `keep`, if given)."
    cfg = yaml.safe_load((ROOT / 'configs/study_tiny.yaml').read_text())
    rows = cfg['experiment']['study']['rows']
    cfg['experiment']['study']['rows'] = [r for r in rows if keep is None or r['name'] in keep] + list(extra_rows)
    return cfg

@pytest.fixture
def env(tmp_path, monkeypatch):
    "Scratch data and outputs folders (the judge cache goes under the data folder)."
    monkeypatch.setenv('DDIFF_DATA', str(tmp_path / 'data')); monkeypatch.setenv('DDIFF_OUTPUTS', str(tmp_path / 'outputs'))
    monkeypatch.setenv('OMP_NUM_THREADS', '1'); monkeypatch.setenv('MPLBACKEND', 'Agg')
    return tmp_path

def run_notebook(cfg: dict, run_dir: Path) -> None:
    "Execute the study notebook with papermill, parameters as `ddiff run` passes them."
    import papermill as pm
    run_dir.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(ROOT / 'nbs/experiments/study.ipynb'), str(run_dir / 'study.ipynb'), cwd=str(run_dir), progress_bar=False,
                        kernel_name='python3', parameters={'run_dir': str(run_dir), 'base': '', **{s: cfg.get(s) or {} for s in SECTIONS}})

def mtimes(paths) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in paths}

@pytest.mark.slow
def test_tiny_study_reuse_failure_and_judge(env):
    from ddiff.study import run_study
    cfg = tiny_study([{'name': 'broken', 'overrides': ['train.lr=-1']}])
    run = env / 'outputs' / 'study' / 'tiny'
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match=r'1 of \d+ study rows failed \(broken: ConfigError: train.lr=-1'):
        run_notebook(cfg, run)  # everything is written, then the notebook says which row failed
    for f in ('study.ipynb', 'results.csv', 'results.md', 'bpc_per_strategy.png', 'judge_vs_evals.png', 'judge_vs_entropy.png', 'samples.md', 'metrics.json', 'report.md'):
        assert (run / f).exists(), f
    report = (run / 'report.md').read_text()
    assert '![Likelihood](bpc_per_strategy.png)' in report and 'Best samples at <= 64' in report and str(env) not in report
    lines = list(csv.DictReader(open(run / 'results.csv')))
    status = {r['row']: r['status'] for r in lines}
    names = [r['name'] for r in cfg['experiment']['study']['rows']]
    assert status == {**{n: 'complete' for n in names[:-1]}, 'broken': 'failed'}, status
    broken = next(r for r in lines if r['row'] == 'broken')
    assert 'train.lr' in broken['error'] and '\n' not in broken['error'] and (run / 'rows/broken/error.txt').exists()
    assert {r['sampler'] for r in lines} >= {'ar', 'unmask', 'unmask+remask', 'edit'}
    assert all(float(r['judge_bpc']) > 0 and float(r['bpc']) > 0 for r in lines if r['status'] == 'complete')
    assert {r['model_evals'] for r in lines if r['sampler'] == 'unmask'} == {'4', '8'}
    judges = list((env / 'data' / 'judges').glob('*/judge.json'))
    assert len(judges) == 1
    m = json.loads((run / 'metrics.json').read_text())
    assert m['rows_complete'] == len(names) - 1 and m['rows_failed'] == 1 and m['rows_reused'] == 0
    # a re-run reuses every finished row (no training: checkpoints untouched) and the cached judge; the failed row runs again
    ckpts = sorted(run.glob('rows/*/train/*.pt')) + judges
    before = mtimes(ckpts)
    # a sampler added after a row ran (here: its random-order sets removed) is sampled on the re-run, without training again
    rj = run / 'rows' / 'masked-uniform' / 'result.json'
    r0 = json.loads(rj.read_text())
    json.dump({**r0, 'samples': [s for s in r0['samples'] if s['sampler'] != 'unmask-random']}, open(rj, 'w'))
    res = run_study({s: cfg[s] for s in ('data', 'model', 'train', 'eval')}, cfg['experiment']['study'], run, name='tiny', progress=False)
    assert res['judge']['cached'] and not res['judge']['trained']
    assert [(r['row'], r['status'], r['reused']) for r in res['rows']] == [*((n, 'complete', True) for n in names[:-1]), ('broken', 'failed', False)]
    assert mtimes(ckpts) == before
    again = json.loads(rj.read_text())['samples']
    assert sorted((s['sampler'], s['model_evals']) for s in again) == sorted((s['sampler'], s['model_evals']) for s in r0['samples'])
    scores = lambda ss: [{k: v for k, v in s.items() if k != 'sample_seconds'} for s in ss if s['sampler'] == 'unmask-random']
    assert scores(again) == scores(r0['samples'])  # same seed, same numbers

@pytest.mark.slow
def test_ddiff_run_study(env):
    "`ddiff run` executes the study notebook (once the `study` kind is registered); failed rows fail the run in one line, a re-run reuses the rest."
    from ddiff.experiments import EXPERIMENT_KINDS
    if 'study' not in EXPERIMENT_KINDS: pytest.skip("the 'study' experiment kind is not registered in ddiff.experiments")
    def ddiff_run(cfg):
        p = env / 'study_ar.yaml'
        p.write_text(yaml.safe_dump(cfg))
        return subprocess.run([sys.executable, '-m', 'ddiff.cli', 'run', '--no-progress', str(p)], capture_output=True, text=True, cwd=ROOT, env=os.environ, timeout=900)
    res = ddiff_run(tiny_study([{'name': 'broken', 'overrides': ['train.lr=-1']}], keep=['ar']))
    last = res.stderr.strip().splitlines()[-1]  # (the kernel may print a warning before it)
    assert res.returncode == 2 and '1 of 2 study rows failed (broken: ConfigError: train.lr=-1' in last, res.stderr[-3000:]
    run = env / 'outputs' / 'study' / 'study_tiny'
    assert (run / 'results.md').exists() and (run / 'error.txt').exists()
    res = ddiff_run(tiny_study(keep=['ar']))  # the broken row removed: the AR row is reused and the run completes
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    m = json.loads((run / 'metrics.json').read_text())
    assert m['status'] == 'complete' and m['rows_complete'] == 1 and m['rows_reused'] == 1
