"""Edge cases of the file queue that are awkward in a notebook: killed writers, bad files, waiting, DDP ranks, resume.

Queues are written here with `ddiff.consumer.write_test_file` (the on-disk format of notebook 05), so these tests do
not depend on the providers; the tests at the end run the real producer (`python -m ddiff.prepare`) when it exists.
"""
import json, os, shutil, signal, subprocess, sys, threading, time, warnings
from pathlib import Path

import pytest
import torch

from ddiff.core import DDiffError, atomic_write_json
from ddiff.consumer import Consumer, list_queue_files, queue_file_name, write_test_file

META = dict(format_version=1, recipe='char_diffusion', vocab_size=66, mask_id=65, ignore_index=-100, stored_ignore=255,
            block_size=16, batch_size=4, batches_per_file=3, val_files=3)
N = META['batches_per_file']

@pytest.fixture(autouse=True)
def _isolated_data(tmp_path, monkeypatch):
    "Nothing a test writes lands in the repo's data/ folder."
    monkeypatch.setenv('DDIFF_DATA', str(tmp_path / 'data'))

def make_queue(root: Path, train=range(3), val=False, meta=META) -> Path:
    "A queue folder under `root` with the given train files (and all val files if `val`)."
    q = Path(root) / 'queue'
    atomic_write_json(q / 'meta.json', meta)
    for s in train: write_test_file(q, 'train', s, meta)
    for s in (range(meta['val_files']) if val else ()): write_test_file(q, 'val', s, meta)
    return q

def seq_of(b: dict) -> int:
    "The file seq a test batch came from (write_test_file puts it in column 0 of x)."
    return int(b['x'][0, 0])

def drain(c: Consumer, n: int) -> list[dict[str, torch.Tensor]]:
    return [c.next_batch() for _ in range(n)]

def env_for_child(**extra) -> dict:
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1', **extra}

def read_line_until(proc: subprocess.Popen, want: str) -> list[str]:
    "Lines the child prints up to and including one that starts with `want` (fails if the child ends first)."
    lines = []
    while True:
        line = proc.stdout.readline()
        if not line:
            proc.wait(); raise AssertionError(f'child exited ({proc.returncode}) before printing {want!r}: {lines} {proc.stderr.read()}')
        lines.append(line.strip())
        if line.startswith(want): return lines

# ---------------------------------------------------------------- a writer killed with SIGKILL

HALF_WRITER = r"""
import json, os, sys, time
from pathlib import Path
from ddiff.consumer import write_test_file
q, n_ok = Path(sys.argv[1]), int(sys.argv[2])
meta = json.loads((q / 'meta.json').read_text())
for s in range(n_ok):
    write_test_file(q, 'train', s, meta); print('wrote', s, flush=True)
real_fdopen = os.fdopen
class HalfWrite:
    "A file whose write stops half-way and hangs, so the kill lands mid-write."
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *a): return self.f.__exit__(*a)
    def __getattr__(self, k): return getattr(self.f, k)
    def write(self, b):
        self.f.write(b[:len(b) // 2]); self.f.flush(); os.fsync(self.f.fileno())
        print('half', flush=True); time.sleep(600)
os.fdopen = lambda *a, **k: HalfWrite(real_fdopen(*a, **k))
write_test_file(q, 'train', n_ok, meta)
"""

LOOP_WRITER = r"""
import json, sys
from pathlib import Path
from ddiff.consumer import write_test_file
q = Path(sys.argv[1]); meta = json.loads((q / 'meta.json').read_text())
s = 0
while True:
    write_test_file(q, 'train', s, meta); print('wrote', s, flush=True); s += 1
"""

def assert_consumer_reads_only_whole_files(q: Path, n_files: int):
    "The consumer serves exactly `n_files` complete files, warns about nothing, and then finds nothing more."
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a quarantine warning would fail the test
        with Consumer(q, timeout=0) as c:
            got = [seq_of(b) for b in drain(c, n_files * q_meta(q)['batches_per_file'])]
            with pytest.raises(DDiffError, match='within timeout=0 s'): c.next_batch()
    assert got == [s for s in range(n_files) for _ in range(q_meta(q)['batches_per_file'])]
    assert not (q / 'train' / 'quarantine').exists()

def q_meta(q: Path) -> dict: return json.loads((q / 'meta.json').read_text())

def test_writer_killed_mid_write_leaves_only_a_temp_file(tmp_path):
    q = make_queue(tmp_path, train=[])
    proc = subprocess.Popen([sys.executable, '-c', HALF_WRITER, str(q), '2'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env_for_child())
    try: read_line_until(proc, 'half')
    finally: proc.send_signal(signal.SIGKILL); proc.wait(); proc.stdout.close(); proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    names = sorted(os.listdir(q / 'train'))
    tmps = [n for n in names if n.startswith('.tmp-')]
    assert len(tmps) == 1 and tmps[0].startswith('.tmp-train-00000002.safetensors'), names
    assert sorted(list_queue_files(q / 'train', 'train')) == [0, 1]
    assert_consumer_reads_only_whole_files(q, 2)
    assert os.listdir(q / 'train') == tmps  # the consumer neither read nor removed the temp file

def test_writer_killed_at_any_moment_never_leaves_a_partial_file(tmp_path):
    # big files, so that the kill most likely lands inside a write; the check holds wherever it lands
    meta = {**META, 'block_size': 512, 'batch_size': 32, 'batches_per_file': 8}
    q = make_queue(tmp_path, train=[], meta=meta)
    proc = subprocess.Popen([sys.executable, '-c', LOOP_WRITER, str(q)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env_for_child())
    try: read_line_until(proc, 'wrote 2')
    finally: proc.send_signal(signal.SIGKILL); proc.wait(); proc.stdout.close(); proc.stderr.close()
    done = sorted(list_queue_files(q / 'train', 'train'))
    assert done == list(range(len(done))) and len(done) >= 3
    assert all(n.startswith('.tmp-') for n in os.listdir(q / 'train') if not n.startswith('train-'))
    assert_consumer_reads_only_whole_files(q, len(done))

# ---------------------------------------------------------------- bad files are quarantined

@pytest.mark.parametrize('damage', ['truncate', 'empty', 'garbage', 'wrong_shape', 'wrong_seq'])
def test_bad_file_is_quarantined_and_consumer_continues(tmp_path, damage):
    q = make_queue(tmp_path, train=range(3))
    p = q / 'train' / queue_file_name('train', 1)
    data = p.read_bytes()
    if damage == 'truncate': p.write_bytes(data[:len(data) // 2])
    elif damage == 'empty': p.write_bytes(b'')
    elif damage == 'garbage': p.write_bytes(os.urandom(64) + data[64:])
    elif damage == 'wrong_shape': write_test_file(tmp_path / 'other', 'train', 1, {**META, 'block_size': 8}); shutil.copy(tmp_path / 'other' / 'train' / p.name, p)
    elif damage == 'wrong_seq': shutil.copy(q / 'train' / queue_file_name('train', 2), p)
    with pytest.warns(UserWarning, match='quarantine') as rec, Consumer(q, timeout=0) as c:
        got = [seq_of(b) for b in drain(c, 2 * N)]
    assert got == [0] * N + [2] * N
    assert (q / 'train' / 'quarantine' / p.name).is_file()
    assert list_queue_files(q / 'train', 'train') == {}
    msg = str(rec[0].message)
    assert '\n' not in msg and p.name in msg

def test_bad_val_file_is_skipped_but_the_rest_of_the_val_set_still_cycles(tmp_path):
    q = make_queue(tmp_path, train=[], val=True)
    p = q / 'val' / queue_file_name('val', 1)
    p.write_bytes(p.read_bytes()[:50])
    with pytest.warns(UserWarning, match='quarantine'), Consumer(q, split='val', timeout=0) as v:
        assert [seq_of(b) for b in v.iter_epoch()] == [0] * N + [2] * N
        assert [seq_of(v.next_batch()) for _ in range(3 * N)] == [0] * N + [2] * N + [0] * N
    assert sorted(list_queue_files(q / 'val', 'val')) == [0, 2]

def test_only_queue_names_are_read(tmp_path):
    q = make_queue(tmp_path, train=[0, 2, 5])
    for n in ['.tmp-train-00000001.safetensors.abc', 'train-1.safetensors', 'notes.txt', '.seq', 'train-00000003.safetensors.bak']:
        (q / 'train' / n).write_bytes(b'not a queue file')
    shutil.copy(q / 'train' / queue_file_name('train', 0), q / 'train' / queue_file_name('val', 7))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with Consumer(q, timeout=0) as c:
            assert [seq_of(b) for b in drain(c, 3 * N)] == [0] * N + [2] * N + [5] * N  # gaps in seq are skipped
            with pytest.raises(DDiffError, match='within timeout'): c.next_batch()

def test_quarantine_never_overwrites_an_earlier_file(tmp_path):
    q = make_queue(tmp_path, train=[])
    name = queue_file_name('train', 0)
    (q / 'train').mkdir()
    for i, junk in enumerate([b'first', b'second', b'third']):
        (q / 'train' / name).write_bytes(junk)
        with pytest.warns(UserWarning, match='quarantine'), Consumer(q, timeout=0) as c:
            with pytest.raises(DDiffError, match='within timeout'): c.next_batch()
    qdir = q / 'train' / 'quarantine'
    assert sorted(os.listdir(qdir)) == [name, name + '.1', name + '.2']
    assert [(qdir / n).read_bytes() for n in (name, name + '.1', name + '.2')] == [b'first', b'second', b'third']

@pytest.mark.parametrize('kind', ['fifo', 'folder'])
def test_non_regular_file_is_skipped_unopened_and_timeout_holds(tmp_path, kind):
    q = make_queue(tmp_path, train=[1])
    odd = q / 'train' / queue_file_name('train', 0)
    os.mkfifo(odd) if kind == 'fifo' else odd.mkdir()
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match='FIFO' if kind == 'fifo' else 'folder') as rec, Consumer(q, timeout=0.3) as c:
        assert [seq_of(b) for b in drain(c, N)] == [1] * N  # the odd name is skipped, the next file served
        with pytest.raises(DDiffError, match='within timeout=0.3 s'): c.next_batch()  # and it does not hang on it
    assert time.monotonic() - t0 < 60
    assert str(odd) in str(rec[0].message) and '\n' not in str(rec[0].message)
    assert odd.exists() and not (q / 'train' / 'quarantine').exists()  # left where it is, never opened or moved

def test_fifo_as_the_only_file_times_out(tmp_path):
    q = make_queue(tmp_path, train=[])
    (q / 'train').mkdir(); os.mkfifo(q / 'train' / queue_file_name('train', 0))
    with pytest.warns(UserWarning, match='FIFO'), Consumer(q, timeout=0.2) as c:
        with pytest.raises(DDiffError, match='within timeout=0.2 s'): c.next_batch()

def test_fifo_val_file_is_dropped_from_the_val_set(tmp_path):
    q = make_queue(tmp_path, train=[], val=True)
    p = q / 'val' / queue_file_name('val', 1)
    p.unlink(); os.mkfifo(p)
    with pytest.warns(UserWarning, match='FIFO'), Consumer(q, split='val', timeout=0.2) as v:
        assert [seq_of(b) for b in v.iter_epoch()] == [0] * N + [2] * N
    with pytest.warns(UserWarning, match='FIFO'), Consumer(q, split='val', timeout=0.2) as v:
        assert [seq_of(v.next_batch()) for _ in range(3 * N)] == [0] * N + [2] * N + [0] * N

def test_missing_queue_folder_stops_with_one_line(tmp_path):
    missing = tmp_path / 'not' / 'there'
    t0 = time.monotonic()
    with pytest.raises(DDiffError) as e: Consumer(missing, split='val', timeout=0.3)
    assert 0.3 <= time.monotonic() - t0 < 30
    msg = str(e.value)
    assert '\n' not in msg and str(missing) in msg and 'does not exist' in msg and 'ddiff prepare' in msg
    with pytest.raises(DDiffError, match='no producer was started'): Consumer(missing)  # no timeout: at once, not forever

def test_missing_queue_folder_ends_a_process_that_set_no_timeout(tmp_path):
    "A val consumer made the way `ddiff evaluate ... --queue <missing>` makes it (no timeout, no producer) ends instead of hanging."
    code = "from ddiff.consumer import Consumer; import sys; Consumer(sys.argv[1], split='val', device='cpu')"
    r = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'missing')], capture_output=True, text=True, timeout=120, env=env_for_child())
    assert r.returncode != 0 and 'does not exist' in r.stderr

# ---------------------------------------------------------------- declared fields (dict batches)

AUX = {**META, 'fields': {'x': {'dtype': 'uint8', 'shape': [4, 16]}, 'y': {'dtype': 'uint8', 'shape': [4, 16], 'ignore': True},
                          'cls': {'dtype': 'uint8', 'shape': [4, 16], 'ignore': True}, 'level': {'dtype': 'float32', 'shape': [4]},
                          'n': {'dtype': 'int64', 'shape': [4]}}}

def test_declared_fields_come_out_as_a_dict(tmp_path):
    from ddiff.consumer import read_queue_file
    q = make_queue(tmp_path, train=[0], val=True, meta=AUX)
    t, _ = read_queue_file(q / 'train' / queue_file_name('train', 0))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with Consumer(q, timeout=0) as c:
            for i in range(N):
                b = c.next_batch()
                assert sorted(b) == ['cls', 'level', 'n', 'x', 'y']
                assert {k: v.dtype for k, v in b.items()} == {'x': torch.int64, 'y': torch.int64, 'cls': torch.int64,
                                                              'level': torch.float32, 'n': torch.int64}
                assert b['level'].shape == b['n'].shape == (4,) and b['cls'].shape == (4, 16)
                for k in ('y', 'cls'): assert torch.equal(b[k], t[k][i].long().masked_fill(t[k][i] == 255, -100))
                assert torch.equal(b['x'], t['x'][i].long()) and torch.equal(b['level'], t['level'][i]) and torch.equal(b['n'], t['n'][i])
        with Consumer(q, split='val', timeout=0) as v: assert all(sorted(b) == sorted(AUX['fields']) for b in v.iter_epoch())

@pytest.mark.parametrize('change,reason', [
    ({'level': {'dtype': 'float64', 'shape': [4]}}, "field 'level' has dtype float64; expected float32"),
    ({'n': {'dtype': 'int64', 'shape': [2]}}, "field 'n' has shape (3, 2); expected (N, 4)"),
    ({'extra': {'dtype': 'int64', 'shape': [4]}}, "field 'extra' is not declared"),
    (None, "field 'cls' is missing")])
def test_file_that_does_not_match_the_fields_is_quarantined_naming_the_field(tmp_path, change, reason):
    q = make_queue(tmp_path, train=[1], meta=AUX)
    fields = {k: v for k, v in AUX['fields'].items() if change is not None or k != 'cls'}
    write_test_file(tmp_path / 'other', 'train', 0, {**AUX, 'fields': {**fields, **(change or {})}})
    shutil.copy(tmp_path / 'other' / 'train' / queue_file_name('train', 0), q / 'train' / queue_file_name('train', 0))
    with pytest.warns(UserWarning, match='quarantine') as rec, Consumer(q, timeout=0) as c:
        assert seq_of(c.next_batch()) == 1
    assert reason in str(rec[0].message)

@pytest.mark.parametrize('fields,msg', [({'x': {'dtype': 'int4', 'shape': [4, 16]}}, "field 'x' has dtype='int4'"),
                                         ({'x': {'dtype': 'uint8', 'shape': 'B T'}}, "field 'x' has shape='B T'"),
                                         ({'x': {'dtype': 'int64', 'shape': [4], 'ignore': True}}, 'only uint8 fields'),
                                         ([], 'expected a non-empty object')])
def test_bad_fields_in_meta_are_one_line(tmp_path, fields, msg):
    q = make_queue(tmp_path, train=[], meta={**META, 'fields': fields})
    with pytest.raises(DDiffError) as e: Consumer(q, timeout=0)
    assert msg in str(e.value) and str(q / 'meta.json') in str(e.value) and '\n' not in str(e.value)

# ---------------------------------------------------------------- meta checks

@pytest.mark.parametrize('key,value', [('vocab_size', 65), ('block_size', 32), ('recipe', 'char_random_replacement')])
def test_meta_mismatch_is_one_line(tmp_path, key, value):
    q = make_queue(tmp_path, train=[0])
    with pytest.raises(DDiffError) as e: Consumer(q, expect={'vocab_size': 66, 'block_size': 16, key: value}, timeout=0)
    msg = str(e.value)
    assert '\n' not in msg and f'{key}={META[key]!r}' in msg and f'{key}={value!r}' in msg and str(q) in msg

def test_unsupported_format_version_and_broken_meta(tmp_path):
    q = make_queue(tmp_path, train=[0], meta={**META, 'format_version': 99})
    with pytest.raises(DDiffError, match='format_version=99 but this ddiff reads format_version=1'): Consumer(q, timeout=0)
    (q / 'meta.json').write_text('{"format_version": 1,')
    with pytest.raises(DDiffError, match='is not valid JSON'): Consumer(q, timeout=0)

def test_file_from_other_settings_is_quarantined(tmp_path):
    # a stale file whose batch size disagrees with meta.json must not reach the model
    q = make_queue(tmp_path, train=[1])
    write_test_file(q, 'train', 0, {**META, 'batch_size': 2})
    with pytest.warns(UserWarning, match=r'expected \(N, 4, 16\)'), Consumer(q, timeout=0) as c:
        assert seq_of(c.next_batch()) == 1

def test_file_with_a_stale_meta_hash_is_quarantined(tmp_path):
    meta = {**META, 'meta_hash': 'aaaaaaaaaaaaaaaa'}
    q = make_queue(tmp_path, train=[1], meta=meta)
    write_test_file(q, 'train', 0, {**meta, 'meta_hash': 'bbbbbbbbbbbbbbbb'})  # left over from a queue with other settings
    with pytest.warns(UserWarning, match='stale'), Consumer(q, timeout=0) as c:
        assert seq_of(c.next_batch()) == 1

def test_y_marker_becomes_ignore_index(tmp_path):
    q = make_queue(tmp_path, train=[0], meta={**META, 'ignore_index': -1})
    from ddiff.consumer import read_queue_file
    t, _ = read_queue_file(q / 'train' / queue_file_name('train', 0))
    with Consumer(q, timeout=0) as c:
        for i in range(N):
            b = c.next_batch(); x, y = b['x'], b['y']
            assert sorted(b) == ['x', 'y'] and x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
            want = t['y'][i].long()
            assert torch.equal(y, want.masked_fill(want == 255, -1)) and torch.equal(x, t['x'][i].long())

# ---------------------------------------------------------------- waiting: timeout and a dead producer

def test_timeout_names_the_folder(tmp_path):
    q = make_queue(tmp_path, train=[])
    t0 = time.monotonic()
    with pytest.raises(DDiffError) as e: Consumer(q, timeout=0.3).next_batch()
    assert time.monotonic() - t0 >= 0.3
    msg = str(e.value)
    assert '\n' not in msg and str(q / 'train') in msg and 'timeout=0.3 s' in msg
    with pytest.raises(DDiffError, match=r'queue folder .*nothing does not exist.*waited timeout=0.1 s'): Consumer(tmp_path / 'nothing', timeout=0.1)

def test_dead_producer_is_an_error_not_a_hang(tmp_path):
    q = make_queue(tmp_path, train=[])
    proc = subprocess.Popen([sys.executable, '-c', 'import sys; sys.exit(7)'])
    with pytest.raises(DDiffError) as e: Consumer(q, producer=proc).next_batch()  # no timeout: it must not wait forever
    msg = str(e.value)
    assert '\n' not in msg and 'exited with code 7' in msg and str(proc.pid) in msg
    # the same while waiting for meta.json
    with pytest.raises(DDiffError, match='exited with code 7'): Consumer(tmp_path / 'nothing', producer=proc)

def test_files_written_just_before_the_producer_exits_are_served(tmp_path):
    q = make_queue(tmp_path, train=[])
    code = f"""
import json, sys, time
from pathlib import Path
from ddiff.consumer import write_test_file
q = Path({str(q)!r}); meta = json.loads((q / 'meta.json').read_text())
time.sleep(0.5)
for s in range(2): write_test_file(q, 'train', s, meta)
"""
    proc = subprocess.Popen([sys.executable, '-c', code], env=env_for_child())
    try:
        with Consumer(q, producer=proc, timeout=120) as c:
            assert [seq_of(b) for b in drain(c, 2 * N)] == [0] * N + [1] * N
            with pytest.raises(DDiffError, match='exited with code 0'): c.next_batch()
    finally: proc.kill(); proc.wait()

def test_consumer_waits_for_a_slow_writer(tmp_path):
    q = make_queue(tmp_path, train=[])
    def writer():
        for s in range(4):
            time.sleep(0.05); write_test_file(q, 'train', s, META)
    t = threading.Thread(target=writer); t.start()
    try:
        with Consumer(q, timeout=60, poll=0.01) as c: got = [seq_of(b) for b in drain(c, 4 * N)]
    finally: t.join()
    assert got == [s for s in range(4) for _ in range(N)]

# ---------------------------------------------------------------- DDP ranks

@pytest.mark.parametrize('world_size', [2, 3])
def test_ranks_never_take_the_same_file(tmp_path, world_size):
    n_files = 12
    q = make_queue(tmp_path, train=[])
    got: dict[int, list[int]] = {}
    errors = []
    def rank_main(r):
        try:
            with Consumer(q, rank=r, world_size=world_size, timeout=60, poll=0.01) as c:
                mine = len(range(r, n_files, world_size))
                got[r] = [seq_of(b) for b in drain(c, mine * N)]
        except BaseException as e: errors.append(e)
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads: t.start()
    for s in range(n_files): write_test_file(q, 'train', s, META)  # written while the ranks consume
    for t in threads: t.join()
    assert not errors, errors
    files = {r: sorted(set(v)) for r, v in got.items()}
    for r in range(world_size): assert files[r] == list(range(r, n_files, world_size))
    assert sum(len(v) for v in files.values()) == n_files  # disjoint and complete
    assert list_queue_files(q / 'train', 'train') == {}

def test_ranks_in_separate_processes(tmp_path):
    q = make_queue(tmp_path, train=range(8))
    code = """
import sys
from ddiff.consumer import Consumer
q, r = sys.argv[1], int(sys.argv[2])
with Consumer(q, rank=r, world_size=2, timeout=0) as c:
    print(' '.join(str(int(c.next_batch()['x'][0, 0])) for _ in range(4 * 3)))
"""
    procs = [subprocess.Popen([sys.executable, '-c', code, str(q), str(r)], stdout=subprocess.PIPE, text=True, env=env_for_child())
             for r in range(2)]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(set(outs[0])) == ['0', '2', '4', '6'] and sorted(set(outs[1])) == ['1', '3', '5', '7']

# ---------------------------------------------------------------- exact resume

def stream(c: Consumer, n: int) -> list[dict[str, torch.Tensor]]: return drain(c, n)

def same(a, b) -> bool: return len(a) == len(b) and all(p.keys() == q.keys() and all(torch.equal(p[k], q[k]) for k in p) for p, q in zip(a, b))

@pytest.mark.parametrize('stop', [0, 1, N - 1, N, N + 1, 2 * N, 3 * N - 1])
def test_exact_resume_train(tmp_path, stop):
    template = make_queue(tmp_path / 't', train=range(4))
    total = 4 * N
    q_ref = shutil.copytree(template, tmp_path / 'ref')
    with Consumer(q_ref, timeout=0) as c: ref = stream(c, total)
    q = shutil.copytree(template, tmp_path / 'run')
    c = Consumer(q, timeout=0)
    first = stream(c, stop)
    state = json.loads(json.dumps(c.state_dict()))  # as a checkpoint stores it
    c.close()  # crash; the consumer's prefetched file stays on disk
    with Consumer(q, timeout=0) as c2:
        c2.load_state_dict(state)
        assert c2.state_dict() == state
        rest = stream(c2, total - stop)
        with pytest.raises(DDiffError, match='within timeout'): c2.next_batch()
    assert same(first + rest, ref)

def test_exact_resume_with_ranks(tmp_path):
    template = make_queue(tmp_path / 't', train=range(6))
    for r in range(2):
        q_ref = shutil.copytree(template, tmp_path / f'ref{r}')
        with Consumer(q_ref, rank=r, world_size=2, timeout=0) as c: ref = stream(c, 3 * N)
        q = shutil.copytree(template, tmp_path / f'run{r}')
        with Consumer(q, rank=r, world_size=2, timeout=0) as c: first = stream(c, N + 1); state = c.state_dict()
        with Consumer(q, rank=r, world_size=2, timeout=0) as c2:
            c2.load_state_dict(state); rest = stream(c2, 2 * N - 1)
        assert same(first + rest, ref)

@pytest.mark.parametrize('stop', [0, 2, N, 2 * N + 1, 5 * N])
def test_exact_resume_val_cycle(tmp_path, stop):
    q = make_queue(tmp_path, train=[], val=True)
    with Consumer(q, split='val', timeout=0) as v: ref = stream(v, 7 * N)
    with Consumer(q, split='val', timeout=0) as v: first = stream(v, stop); state = v.state_dict()
    with Consumer(q, split='val', timeout=0) as v2:
        v2.load_state_dict(state); rest = stream(v2, 7 * N - stop)
    assert same(first + rest, ref)

def test_resume_when_the_saved_file_is_gone_warns_and_continues(tmp_path):
    q = make_queue(tmp_path, train=range(3))
    with Consumer(q, timeout=0) as c: stream(c, 1); state = c.state_dict()
    (q / 'train' / queue_file_name('train', 0)).unlink()
    with pytest.warns(UserWarning, match='is gone'), Consumer(q, timeout=0) as c2:
        c2.load_state_dict(state)
        assert seq_of(c2.next_batch()) == 1

def test_state_from_another_layout_is_refused(tmp_path):
    q = make_queue(tmp_path, train=range(1), val=True)
    with Consumer(q, timeout=0) as c, Consumer(q, split='val', timeout=0) as v:
        with pytest.raises(DDiffError, match="split='val' but this consumer has split='train'"): c.load_state_dict(v.state_dict())
        with pytest.raises(DDiffError, match='not a position'): c.load_state_dict({**c.state_dict(), 'batch': -1})

# ---------------------------------------------------------------- the real producer (notebooks 05-06)

def _have_producer() -> bool:
    "Whether the real producer (notebooks 05-06) is exported and importable."
    try: import ddiff.providers, ddiff.prepare  # noqa: F401
    except Exception: return False
    return True

needs_producer = pytest.mark.skipif(not _have_producer(), reason='ddiff.providers / ddiff.prepare not written yet')

SMALL_DATA = dict(corpus='tinyshakespeare', block_size=32, batch_size=4, batches_per_file=2, val_files=2, seed=11, max_backlog=64)

def write_config(path: Path, **data) -> Path:
    import yaml
    path.write_text(yaml.safe_dump({'data': {**SMALL_DATA, **data}}))
    return path

def find_queue(data_root: Path) -> Path:
    metas = sorted(data_root.glob('**/queue/meta.json'))
    assert len(metas) == 1, metas
    return metas[0].parent

def queue_bytes(q: Path) -> dict[str, bytes]:
    "Every finished file of a queue (meta.json and both splits) by relative path."
    out = {'meta.json': (q / 'meta.json').read_bytes()}
    for split in ('train', 'val'):
        for s, p in sorted(list_queue_files(q / split, split).items()): out[f'{split}/{p.name}'] = p.read_bytes()
    return out

@needs_producer
@pytest.mark.slow
def test_same_seed_in_two_producer_processes_gives_identical_files(tmp_path):
    cfg = write_config(tmp_path / 'cfg.yaml')
    roots = [tmp_path / 'a', tmp_path / 'b']
    procs = [subprocess.Popen([sys.executable, '-m', 'ddiff.prepare', str(cfg), '--max-files', '3'], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env_for_child(DDIFF_DATA=str(r))) for r in roots]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    a, b = (queue_bytes(find_queue(r)) for r in roots)
    assert sorted(a) == ['meta.json', 'train/train-00000000.safetensors', 'train/train-00000001.safetensors',
                         'train/train-00000002.safetensors', 'val/val-00000000.safetensors', 'val/val-00000001.safetensors']
    from ddiff.consumer import read_queue_file
    for name in a:  # first the content (tensors and metadata), then the bytes (header order included)
        if name == 'meta.json': continue
        (ta, ma), (tb, mb) = read_queue_file(find_queue(roots[0]) / name), read_queue_file(find_queue(roots[1]) / name)
        assert ma == mb and sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta), f'{name}: contents differ'
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f'same contents but different bytes (safetensors header order?) in {differ}'
    # and the consumer reads what the real producer wrote
    q = find_queue(roots[0])
    meta = json.loads((q / 'meta.json').read_text())
    expect = {'block_size': 32, 'batch_size': 4, 'recipe': 'char_diffusion', 'vocab_size': meta['vocab_size']}
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with Consumer(q, split='val', expect=expect, timeout=0) as v:
            assert len(list(v.iter_epoch())) == 2 * 2
        with Consumer(q, expect=expect, timeout=0) as c:
            for b in drain(c, 3 * 2):
                x, y = b['x'], b['y']
                assert x.shape == y.shape == (4, 32) and int(x.max()) < meta['vocab_size']
                assert ((y == meta['ignore_index']) | ((y >= 0) & (y < meta['vocab_size']))).all()
            with pytest.raises(DDiffError, match='within timeout'): c.next_batch()
    assert list_queue_files(q / 'train', 'train') == {}

@needs_producer
@pytest.mark.slow
def test_producer_killed_mid_run_leaves_no_partial_file(tmp_path):
    cfg = write_config(tmp_path / 'cfg.yaml', block_size=256, batch_size=32, batches_per_file=16, max_backlog=1000)
    root = tmp_path / 'data'
    proc = subprocess.Popen([sys.executable, '-m', 'ddiff.prepare', str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env_for_child(DDIFF_DATA=str(root)))
    try:
        deadline = time.monotonic() + 300  # generous: only a guard against a hang
        while time.monotonic() < deadline and proc.poll() is None:
            metas = list(root.glob('**/queue/meta.json'))
            if metas and len(list_queue_files(metas[0].parent / 'train', 'train')) >= 2: break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
    finally: proc.send_signal(signal.SIGKILL); proc.wait(); proc.stderr.close()
    q = find_queue(root)
    n = len(list_queue_files(q / 'train', 'train'))
    assert n >= 2
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a quarantined (partial) file would fail here
        with Consumer(q, timeout=0) as c:
            assert len(drain(c, n * 16)) == n * 16
            with pytest.raises(DDiffError, match='within timeout'): c.next_batch()
        with Consumer(q, split='val', timeout=0) as v: assert len(list(v.iter_epoch())) == 2 * 16
    assert not (q / 'train' / 'quarantine').exists()
    assert all(name.startswith('.') for name in os.listdir(q / 'train'))  # only .seq and perhaps a .tmp- file remain

@needs_producer
@pytest.mark.slow
def test_consumer_with_a_producer_process(tmp_path, monkeypatch):
    from ddiff.prepare import start_producer_process
    monkeypatch.setenv('DDIFF_DATA', str(tmp_path / 'data'))
    proc = start_producer_process({'data': SMALL_DATA}, max_files=2)
    try:
        q = tmp_path / 'data' / 'tinyshakespeare-char_diffusion' / 'queue'
        with Consumer(q, producer=proc, timeout=300) as c:
            assert len(drain(c, 2 * 2)) == 4
            with pytest.raises(DDiffError, match='exited with code 0'): c.next_batch()
    finally:
        if proc.poll() is None: proc.kill()
        proc.wait()
