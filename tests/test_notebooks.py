"""Run every notebook in nbs/ as a test, each in its own process (the notebooks are the docs *and* the tests).

`pytest` runs all cells, the `#| slow` ones included; `pytest -m "not slow"` skips slow cells (like plain `nbdev_test`).
"""
import os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / 'nbs').glob('[0-9]*.ipynb'))

RUNNER = """
import sys
from pathlib import Path
from nbdev.test import test_nb
ok, secs = test_nb(Path(sys.argv[1]), skip_flags=sys.argv[2].split())
print(f'{Path(sys.argv[1]).name}: {secs:.1f}s')
sys.exit(0 if ok else 1)
"""

def _skip_flags(config) -> str:
    "Skip `slow` cells only when the run deselects slow tests (`-m 'not slow'`)."
    return 'slow' if 'not slow' in (config.option.markexpr or '') else ''

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(nb: Path, request):
    env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1'), 'MPLBACKEND': 'Agg'}
    res = subprocess.run([sys.executable, '-c', RUNNER, str(nb), _skip_flags(request.config)],
                         cwd=nb.parent, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, f'{nb.name} failed:\n{res.stdout[-4000:]}\n{res.stderr[-8000:]}'
