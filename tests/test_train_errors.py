"""`ddiff train` refuses bad input with one line (exit 2) and loses nothing: a refused queue keeps its files, an
unwritable run folder stops before a producer starts, and a loss that stops being finite keeps the last finite
checkpoint."""
import os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / 'configs' / 'tiny.yaml')


def _run(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'DDIFF_DATA': str(tmp / 'data'), 'DDIFF_OUTPUTS': str(tmp / 'outputs'),
           'PYTHONPATH': os.pathsep.join([str(ROOT), *filter(None, [os.environ.get('PYTHONPATH')])])}
    return subprocess.run([sys.executable, '-m', 'ddiff.cli', 'train', TINY, 'train.progress=false', 'train.device=cpu', *args],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp)


def _one_line(res: subprocess.CompletedProcess) -> str:
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and len(lines) == 1 and 'Traceback' not in res.stderr, res.stderr[-2000:]
    return lines[0]


@pytest.mark.slow
def test_refused_queue_keeps_its_files(tmp_path):
    ok = _run(tmp_path, 'train.max_steps=3', 'train.eval_interval=3', 'train.final_eval=false', 'data.max_backlog=3')
    assert ok.returncode == 0, ok.stderr[-2000:]
    train_dir = tmp_path / 'data' / 'tiny-char_diffusion' / 'queue' / 'train'
    before = sorted(p.name for p in train_dir.rglob('*.safetensors'))
    assert before
    line = _one_line(_run(tmp_path, 'data.block_size=32', 'train.max_steps=3'))
    assert 'was made with different data settings' in line and 'block_size: 64 -> 32' in line
    assert sorted(p.name for p in train_dir.rglob('*.safetensors')) == before  # nothing was reset


def test_unwritable_run_folder_is_one_line_before_anything_starts(tmp_path):
    (tmp_path / 'a_file').write_text('x')
    line = _one_line(_run(tmp_path, f'train.out_dir={tmp_path / "a_file" / "run"}'))
    assert 'train.out_dir' in line and 'a_file' in line
    assert not (tmp_path / 'data').exists()  # no queue made, no producer started


def test_non_finite_config_values_are_refused(tmp_path):
    for bad, key in (('train.lr=.inf', 'train.lr'), ('train.weight_decay=.nan', 'train.weight_decay')):
        line = _one_line(_run(tmp_path, bad))
        assert key in line and 'finite' in line, line


@pytest.mark.slow
def test_diverging_run_stops_and_keeps_the_last_finite_checkpoint(tmp_path):
    out = tmp_path / 'run'
    ok = _run(tmp_path, 'train.max_steps=4', 'train.eval_interval=2', 'train.final_eval=false', f'train.out_dir={out}')
    assert ok.returncode == 0, ok.stderr[-2000:]
    before = (out / 'last.pt').read_bytes()
    res = _run(tmp_path, 'train.max_steps=60', 'train.eval_interval=2', 'train.lr=1e6', 'train.resume=true', f'train.out_dir={out}')
    line = [l for l in res.stderr.splitlines() if 'error' in l][-1]
    assert res.returncode == 2 and ('became nan' in line or 'became inf' in line), res.stderr[-2000:]
    import torch
    from ddiff.checkpoint import load_checkpoint
    ck = load_checkpoint(out / 'last.pt')
    assert all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())
    assert (out / 'last.pt').read_bytes() == before or ck['step'] > 4
