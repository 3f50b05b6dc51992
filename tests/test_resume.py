"""Crash-exact training: a run killed (SIGKILL) or stopped (SIGINT, SIGTERM) at random moments and resumed any number
of times ends with exactly the losses and metrics of an uninterrupted run. Small queue files make every kill land
after file boundaries that the last checkpoint did not cover."""
import json, os, random, signal, subprocess, sys, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMON = ['train.max_steps=40', 'train.eval_interval=6', 'train.log_interval=1', 'train.warmup_steps=3',
          'train.progress=false', 'train.device=cpu', 'data.batches_per_file=2', 'data.max_backlog=3',
          'model.dropout=0.1', 'eval.n_windows=4']


def _env(tmp: Path) -> dict:
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'DDIFF_DATA': str(tmp / 'data'), 'DDIFF_OUTPUTS': str(tmp / 'outputs'),
            'PYTHONPATH': os.pathsep.join([str(ROOT), *filter(None, [os.environ.get('PYTHONPATH')])])}


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, '-m', 'ddiff.cli', 'train', str(ROOT / 'configs' / 'tiny.yaml'), *COMMON, f'train.out_dir={out}', *extra]


def _steps_done(out: Path) -> int:
    try: rows = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines() if l.strip()]
    except (OSError, ValueError): return 0
    return max((r['step'] for r in rows if r.get('split') == 'train'), default=0)


def _curve(out: Path) -> tuple[dict, dict]:
    rows = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines() if l.strip()]
    train = {r['step']: r['train/loss_all'] for r in rows if r['split'] == 'train'}
    final = next(r for r in rows if r['split'] == 'final')
    return train, {k: v for k, v in final.items() if isinstance(v, float)}


def _interrupted_run(tmp: Path, how: signal.Signals, rng: random.Random, max_tries: int = 12) -> Path:
    "Start, interrupt with `how` after a random number of steps, resume; repeat until the run finishes."
    out, env = tmp / 'cut', _env(tmp)
    for attempt in range(max_tries):
        resume = ['train.resume=true'] if attempt else []
        p = subprocess.Popen(_cmd(out, *resume), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp)
        target = _steps_done(out) + rng.randint(3, 11)
        deadline = time.time() + 120
        while p.poll() is None and _steps_done(out) < target and time.time() < deadline: time.sleep(0.02)
        if p.poll() is None: p.send_signal(how)
        stdout, stderr = p.communicate(timeout=120)
        with open(tmp / 'stderr.txt', 'a') as f: f.write(f'--- attempt {attempt} (exit {p.returncode}):\n{stderr[-1500:]}\n')
        if p.returncode == 0: return out
        expected = -9 if how == signal.SIGKILL else 128 + int(how)
        assert p.returncode == expected, f'exit {p.returncode}, expected {expected}:\n{stderr[-3000:]}'
        if how != signal.SIGKILL:  # a graceful stop saves last.pt at a step boundary: its step is the last logged step
            from ddiff.checkpoint import load_checkpoint
            assert load_checkpoint(out / 'last.pt')['step'] == _steps_done(out)
    pytest.fail(f'the run did not finish after {max_tries} interruptions')


@pytest.fixture(scope='module')
def reference(tmp_path_factory) -> tuple[dict, dict, Path]:
    tmp = tmp_path_factory.mktemp('ref')
    res = subprocess.run(_cmd(tmp / 'full'), env=_env(tmp), capture_output=True, text=True, timeout=600, cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    return (*_curve(tmp / 'full'), tmp / 'full')


@pytest.mark.slow
@pytest.mark.parametrize('how', [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=['kill-9', 'sigterm', 'sigint'])
def test_interrupted_runs_end_exactly_like_an_uninterrupted_one(tmp_path, reference, how):
    train_ref, final_ref, ref_out = reference
    out = _interrupted_run(tmp_path, how, random.Random(int(how)))
    train_cut, final_cut = _curve(out)
    assert sorted(train_cut) == sorted(train_ref)
    worst = max(abs(train_cut[s] - train_ref[s]) for s in train_ref)
    if worst >= 1e-6:  # say where: the step, and the queue file each run read there
        files = lambda o: {r['step']: r.get('file') for r in map(json.loads, (o / 'metrics.jsonl').read_text().splitlines()) if r['split'] == 'train'}
        fc, fr = files(out), files(ref_out)
        first = min(s for s in train_ref if abs(train_cut[s] - train_ref[s]) >= 1e-6)
        pytest.fail(f'largest per-step loss difference {worst:.2e}; first at step {first}: files read {[fc.get(s) for s in sorted(fc)]}'
                    f' vs uninterrupted {[fr.get(s) for s in sorted(fr)]}; stderr of the attempts: {(out.parent / "stderr.txt").read_text()[-4000:]}')
    for k, v in final_ref.items(): assert abs(final_cut[k] - v) < 1e-6, (k, final_cut[k], v)


def test_a_number_claimed_by_a_killed_producer_is_rewritten_on_resume(tmp_path, monkeypatch):
    "A producer killed between claiming a file number and writing the file leaves a gap; a resumed run fills it before reading."
    monkeypatch.setenv('DDIFF_DATA', str(tmp_path / 'data'))
    from ddiff.config import load_config
    from ddiff.train import fill_lost_files
    from ddiff.providers import make_provider
    from ddiff.consumer import list_queue_files
    cfg = load_config(str(ROOT / 'configs' / 'tiny.yaml'), ['data.batches_per_file=2']).data
    p = make_provider(cfg)
    p.init_queue()
    for _ in range(2): p.write_file('train', p.claim_seq())   # files 0 and 1
    p.claim_seq()                                             # 2 is claimed, then the producer dies
    p.write_file('train', p.claim_seq())                      # 3, by another producer
    folder = p.split_dir('train')
    assert sorted(list_queue_files(folder, 'train')) == [0, 1, 3]
    fill_lost_files(cfg, p.queue, 1)  # what a resumed run does before it reads (its position: file 1)
    files = list_queue_files(folder, 'train')
    assert sorted(files) == [0, 1, 2, 3]
    assert files[2].read_bytes() == p.serialize(p.make_file('train', 2), 'train', 2)  # the very bytes it would have had


INTERRUPT = {  # a SIGTERM to the trainer itself, during the final evaluation or during the last step's checkpoint
    'final evaluation': """
import os, signal, sys, time
import ddiff.train as T
def final_eval(run, st):
    os.kill(os.getpid(), signal.SIGTERM); time.sleep(60)
    raise SystemExit('the signal did not stop the final evaluation')
T.final_eval = final_eval
sys.exit(T.main(sys.argv[1:]))
""",
    'last step': """
import os, signal, sys
import ddiff.train as T
save = T.evaluate_and_save
def evaluate_and_save(run, st, elapsed):
    if st.step == run.tc.max_steps: os.kill(os.getpid(), signal.SIGTERM)
    return save(run, st, elapsed)
T.evaluate_and_save = evaluate_and_save
sys.exit(T.main(sys.argv[1:]))
"""}


@pytest.mark.parametrize('when', list(INTERRUPT))
def test_a_signal_at_the_end_stops_before_the_final_evaluation_and_a_resumed_run_evaluates(tmp_path, when):
    "SIGTERM in the last step or during the final evaluation: exit 143 with complete checkpoints and no final row; resuming only evaluates."
    out, env = tmp_path / 'run', _env(tmp_path)
    args = [str(ROOT / 'configs' / 'tiny.yaml'), 'train.max_steps=4', 'train.eval_interval=2', 'train.progress=false',
            'eval.n_windows=4', f'train.out_dir={out}']
    res = subprocess.run([sys.executable, '-c', INTERRUPT[when], *args], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-3000:]
    assert 'resume with train.resume=true' in res.stderr and ('during the final evaluation' in res.stderr) == (when == 'final evaluation')
    rows = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines() if l.strip()]
    assert max(r['step'] for r in rows) == 4 and not any(r['split'] == 'final' for r in rows)
    res = subprocess.run([sys.executable, '-m', 'ddiff.cli', 'train', *args, 'train.resume=true'], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines() if l.strip()]
    assert [r['split'] for r in rows].count('final') == 1 and [r['step'] for r in rows if r['split'] == 'train'][-1] == 4


def test_a_resumed_run_waits_for_the_producer_of_the_killed_one(tmp_path, capsys):
    "After kill -9 the old producer writes on until it notices; the next run starts its own only once that one is gone."
    from ddiff.train import PRODUCER_PID, wait_for_earlier_producer
    old = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1.5)', 'ddiff.prepare'])
    (tmp_path / PRODUCER_PID).write_text(f'{old.pid}\n')
    wait_for_earlier_producer(tmp_path)
    assert old.poll() is not None, 'returned while the earlier producer still ran'
    (tmp_path / PRODUCER_PID).write_text(f'{os.getpid()}\n')  # a live process that is not a producer (a reused pid) is not waited for
    wait_for_earlier_producer(tmp_path, timeout=0.5)
    assert 'still running' not in capsys.readouterr().err
    stuck = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', 'ddiff.prepare'])  # one that does not notice
    (tmp_path / PRODUCER_PID).write_text(f'{stuck.pid}\n')
    wait_for_earlier_producer(tmp_path, timeout=0.5)  # asked to stop (SIGTERM) after the timeout, then waited for
    assert stuck.wait(timeout=10) == -signal.SIGTERM and 'stopping it' in capsys.readouterr().err
