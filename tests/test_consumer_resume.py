"""Crash-exact resume with `Consumer(keep_until_commit=True)` (issue 9 item 2).

A trainer checkpoints `state_dict()` and then calls `commit()`. Whatever moment it crashes at, a new consumer given
the last checkpoint's state must serve exactly the batches an uninterrupted consumer serves from that point: files
finished after the checkpoint wait in `<split>/consumed/` and are served again. The crashes here are simulated
in-process (a consumer dropped without `commit()`) and, at the end, real: a child process killed with SIGKILL.
"""
import json, os, shutil, signal, subprocess, sys, warnings
from pathlib import Path

import pytest
import torch

from ddiff.core import DDiffError, atomic_write_json
from ddiff.consumer import Consumer, list_queue_files, queue_file_name, write_test_file

META = dict(format_version=1, recipe='char_diffusion', vocab_size=66, mask_id=65, ignore_index=-100, stored_ignore=255,
            block_size=8, batch_size=2, batches_per_file=3, val_files=1)
N = META['batches_per_file']

@pytest.fixture(autouse=True)
def _isolated_data(tmp_path, monkeypatch):
    monkeypatch.setenv('DDIFF_DATA', str(tmp_path / 'data'))

def make_queue(root: Path, files=range(6), meta=META) -> Path:
    q = Path(root) / 'queue'
    atomic_write_json(q / 'meta.json', meta)
    for s in files: write_test_file(q, 'train', s, meta)
    return q

def fingerprint(b: dict, c: Consumer) -> tuple:
    "What identifies a batch: its file, stage and contents."
    return (c.last_seq, c.last_stage, *(int(v.sum()) for v in b.values()), *(int((v * torch.arange(v.numel()).view_as(v)).sum()) for v in b.values()))

def take(c: Consumer, n: int) -> list[tuple]: return [fingerprint(c.next_batch(), c) for _ in range(n)]

def reference(template: Path, root: Path, n: int, **kw) -> list[tuple]:
    "The batches an uninterrupted consumer serves from a copy of `template`."
    with Consumer(shutil.copytree(template, root), timeout=0, **kw) as c: return take(c, n)

def consumed(q: Path) -> list[int]: return sorted(list_queue_files(q / 'train' / 'consumed', 'train'))
def waiting(q: Path) -> list[int]: return sorted(list_queue_files(q / 'train', 'train'))

def as_saved(state: dict) -> dict: return json.loads(json.dumps(state))  # what a checkpoint stores

# ---------------------------------------------------------------- one crash

@pytest.mark.parametrize('ckpt', [0, 1, N - 1, N, N + 2, 2 * N])
@pytest.mark.parametrize('extra', [0, 1, N, 2 * N + 1, 3 * N])  # batches served after the checkpoint, before the crash
def test_crash_after_a_checkpoint_resumes_exactly(tmp_path, ckpt, extra):
    total = 6 * N
    want = reference(make_queue(tmp_path / 't'), tmp_path / 'ref', total)
    q = shutil.copytree(tmp_path / 't' / 'queue', tmp_path / 'run')
    c = Consumer(q, timeout=0, keep_until_commit=True)
    got = take(c, ckpt)
    state = as_saved(c.state_dict()); c.commit()
    take(c, extra)
    assert sorted(waiting(q) + consumed(q)) == list(range(ckpt // N, 6))  # every file not finished before the checkpoint is kept
    c.close()  # crash: no commit after the last checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a 'saved position is gone' warning would fail here
        with Consumer(q, timeout=0, keep_until_commit=True) as c2:
            c2.load_state_dict(state)
            assert c2.state_dict() == state
            got += take(c2, total - ckpt)
            with pytest.raises(DDiffError, match='within timeout'): c2.next_batch()
            c2.commit()
    assert got == want
    assert consumed(q) == [] and waiting(q) == []

def test_crash_between_checkpoint_and_commit(tmp_path):
    "The state lists the consumed files served before it, so a checkpoint whose commit never ran still resumes exactly."
    want = reference(make_queue(tmp_path / 't'), tmp_path / 'ref', 6 * N)
    q = shutil.copytree(tmp_path / 't' / 'queue', tmp_path / 'run')
    with Consumer(q, timeout=0, keep_until_commit=True) as c:
        got = take(c, 2 * N + 1); state = as_saved(c.state_dict())  # crash before commit()
    assert state['served'] == [0, 1] and consumed(q) == [0, 1]
    with Consumer(q, timeout=0, keep_until_commit=True) as c2:
        c2.load_state_dict(state); got += take(c2, 4 * N - 1)
        c2.commit()
    assert got == want and consumed(q) == []

def test_many_interruptions_in_a_row(tmp_path):
    "Checkpoints and crashes at random points (fixed seed), resumed each time from the last checkpoint."
    total = 10 * N
    want = reference(make_queue(tmp_path / 't', files=range(10)), tmp_path / 'ref', total)
    q = shutil.copytree(tmp_path / 't' / 'queue', tmp_path / 'run')
    g = torch.Generator().manual_seed(0)
    got, state, crossed = [], None, 0
    while len(got) < total:
        c = Consumer(q, timeout=0, keep_until_commit=True)
        if state is not None: c.load_state_dict(state)
        n_ok = min(int(torch.randint(0, 2 * N, (1,), generator=g)), total - len(got))
        got += take(c, n_ok)
        state = as_saved(c.state_dict()); c.commit()  # checkpoint
        lost = min(int(torch.randint(0, 2 * N, (1,), generator=g)), total - len(got))
        take(c, lost)                                 # work after the checkpoint, lost in the crash
        crossed += bool(consumed(q))
        c.close()
    assert got == want and crossed >= 3

def test_ranks_resume_exactly_and_touch_only_their_own_files(tmp_path):
    template = make_queue(tmp_path / 't', files=range(8))
    want = {r: reference(template, tmp_path / f'ref{r}', 4 * N, rank=r, world_size=2) for r in range(2)}
    q = shutil.copytree(template, tmp_path / 'run')
    c0, c1 = (Consumer(q, timeout=0, rank=r, world_size=2, keep_until_commit=True) for r in range(2))
    got0, got1 = take(c0, 1), take(c1, 2 * N)
    s0 = as_saved(c0.state_dict()); c0.commit()
    s1 = as_saved(c1.state_dict()); c1.commit()   # rank 1's commit deletes its files 1 and 3 only
    take(c0, 2 * N)                               # rank 0 finishes files 0 and 2 after its checkpoint ...
    assert consumed(q) == [0, 2] and waiting(q) == [4, 5, 6, 7]
    c0.close(); c1.close()                        # ... and both crash
    with Consumer(q, timeout=0, rank=0, world_size=2, keep_until_commit=True) as r0, \
         Consumer(q, timeout=0, rank=1, world_size=2, keep_until_commit=True) as r1:
        r0.load_state_dict(s0); r1.load_state_dict(s1)
        got0 += take(r0, 4 * N - 1); got1 += take(r1, 2 * N)
        r1.commit()
        assert consumed(q) == [0, 2, 4, 6]        # rank 1 never deletes rank 0's files
        r0.commit()
    assert got0 == want[0] and got1 == want[1] and consumed(q) == []

# ---------------------------------------------------------------- what a fresh or a plain consumer does

def test_default_deletes_at_once_and_makes_no_consumed_folder(tmp_path):
    q = make_queue(tmp_path, files=range(2))
    with Consumer(q, timeout=0) as c:
        take(c, N); c.commit()  # commit() is harmless without keep_until_commit
        assert c.state_dict()['served'] == []
    assert waiting(q) == [1] and not (q / 'train' / 'consumed').exists()

def test_fresh_consumer_serves_what_waits_in_consumed_first(tmp_path):
    "A run that crashed before its first checkpoint starts over: a fresh consumer serves the consumed files again, in order."
    want = reference(make_queue(tmp_path / 't'), tmp_path / 'ref', 3 * N, rank=0, world_size=2)
    q = shutil.copytree(tmp_path / 't' / 'queue', tmp_path / 'run')
    with Consumer(q, timeout=0, rank=0, world_size=2, keep_until_commit=True) as c: take(c, 2 * N + 1)  # crash, no checkpoint
    with Consumer(q, timeout=0, rank=1, world_size=2, keep_until_commit=True) as c: take(c, N); c.commit()
    assert consumed(q) == [0, 2]
    with Consumer(q, timeout=0, rank=0, world_size=2, keep_until_commit=True) as c:
        assert c.state_dict()['served'] == [] and take(c, 3 * N) == want
        c.commit()
    assert consumed(q) == [] and waiting(q) == [3, 5]  # rank 1's files are untouched

def test_state_without_served_treats_consumed_files_as_served(tmp_path):
    "A checkpoint written before `served` existed: its files were deleted on use, so consumed/ holds nothing it needs."
    q = make_queue(tmp_path, files=range(3))
    with Consumer(q, timeout=0, keep_until_commit=True) as c:
        take(c, N + 1); state = {k: v for k, v in c.state_dict().items() if k != 'served'}
    with Consumer(q, timeout=0, keep_until_commit=True) as c2:
        c2.load_state_dict(state)
        assert [x[0] for x in take(c2, 2 * N - 1)] == [1] * (N - 1) + [2] * N

def test_resume_position_in_consumed_file(tmp_path):
    "The file the checkpoint was in the middle of may have been finished (and moved) before the crash."
    q = make_queue(tmp_path, files=range(3))
    with Consumer(q, timeout=0, keep_until_commit=True) as c:
        take(c, 1); state = as_saved(c.state_dict()); c.commit(); take(c, N)
    assert consumed(q) == [0] and waiting(q) == [1, 2]
    with Consumer(q, timeout=0, keep_until_commit=True) as c2:
        c2.load_state_dict(state)
        assert [x[0] for x in take(c2, 3 * N - 1)] == [0] * (N - 1) + [1] * N + [2] * N

# ---------------------------------------------------------------- a real crash: SIGKILL at random moments

CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
from ddiff.consumer import Consumer
from ddiff.core import atomic_write_json
sys.path.insert(0, sys.argv[5])
from test_consumer_resume import fingerprint
q, ckpt, total, every = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
c = Consumer(q, timeout=30, keep_until_commit=True)
step = 0
if ckpt.exists():
    ck = json.loads(ckpt.read_text()); c.load_state_dict(ck['consumer']); step = ck['step']
print('ready', step, flush=True)
while step < total:
    fp = fingerprint(c.next_batch(), c)
    print('batch', step, json.dumps(fp), flush=True)
    step += 1
    if step % every == 0:
        atomic_write_json(ckpt, {'step': step, 'consumer': c.state_dict()}); c.commit()
    time.sleep(0.005)
print('done', flush=True)
"""

@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_exactly(tmp_path):
    meta = {**META, 'batches_per_file': 4}
    n_files, every = 30, 6  # checkpoints fall at varying places in a file
    total = n_files * meta['batches_per_file']
    want = reference(make_queue(tmp_path / 't', files=range(n_files), meta=meta), tmp_path / 'ref', total)
    q = shutil.copytree(tmp_path / 't' / 'queue', tmp_path / 'run')
    ckpt = tmp_path / 'ckpt.json'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    g = torch.Generator().manual_seed(1)
    kills, after_boundary, done = 0, 0, False
    while not done:
        proc = subprocess.Popen([sys.executable, '-c', CHILD, str(q), str(ckpt), str(total), str(every), str(Path(__file__).parent)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        killed = False
        try:
            first = proc.stdout.readline().split()
            assert first[:1] == ['ready'], (first, proc.stderr.read()[-2000:])
            target = int(first[1]) + int(torch.randint(1, 3 * every, (1,), generator=g)) if kills < 12 else None
            for line in proc.stdout:
                word, *rest = line.split(maxsplit=2)
                if word == 'done': done = True; break
                step, fp = int(rest[0]), tuple(json.loads(rest[1]))
                assert fp == want[step], f'step {step}: served {fp}, an uninterrupted run serves {want[step]}'
                if target is not None and step >= target:
                    proc.send_signal(signal.SIGKILL); kills += 1; killed = True
                    break
            if not (done or killed): proc.wait(); raise AssertionError(f'child exited {proc.returncode}: {proc.stderr.read()[-2000:]}')
        finally:
            if proc.poll() is None and not done: proc.kill()
            proc.wait(); proc.stdout.close(); proc.stderr.close()
        after_boundary += bool(consumed(q))  # a file was finished after the last checkpoint: the old consumer lost it
    assert kills >= 6 and after_boundary >= 3, (kills, after_boundary)  # a child may finish before a late kill lands
    assert waiting(q) == [] and consumed(q) == []  # the last commit (at step == total) removed everything
