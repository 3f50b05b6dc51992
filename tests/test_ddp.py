"""Data-parallel training with torchrun: two CPU processes (gloo) train the tiny config and read different queue files."""
import json, os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

@pytest.mark.slow
def test_ddp_two_ranks(tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'DDIFF_DATA': str(tmp_path / 'data'), 'DDIFF_OUTPUTS': str(tmp_path / 'outputs'),
           'DDIFF_DATA_MIRROR': os.environ.get('DDIFF_DATA_MIRROR', '/work/shared/data'), 'PYTHONPATH': os.pathsep.join([str(ROOT), *filter(None, [os.environ.get('PYTHONPATH')])])}
    out = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'ddiff.train', str(ROOT / 'configs' / 'tiny.yaml'),
           'train.max_steps=12', 'train.eval_interval=6', 'train.log_interval=3', 'train.progress=false',
           'train.final_eval=false', 'train.device=cpu', f'train.out_dir={out}', 'data.batches_per_file=4']
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f'torchrun failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}'
    result = json.loads((out / 'result.json').read_text())
    assert result['world_size'] == 2 and result['step'] == 12
    files = {r['rank']: set(r['files']) for r in result['ranks']}
    assert files[0] and files[1] and not files[0] & files[1], files   # each rank read its own files
    assert all(s % 2 == r for r, fs in files.items() for s in fs), files
    assert (out / 'last.pt').is_file() and (out / 'metrics.jsonl').is_file()
    rows = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows if r['split'] == 'train'] == [3, 6, 9, 12]  # written once (by rank 0 only)
    # the checkpoint holds one consumer position per rank, so the run can resume exactly
    from ddiff.checkpoint import load_checkpoint
    ck = load_checkpoint(out / 'last.pt')
    assert [s['rank'] for s in ck['consumer_state']] == [0, 1]
