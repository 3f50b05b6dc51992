"""Shared pytest settings: the `slow` marker, the local corpus mirror, one torch thread per test process."""
import os, shutil
from pathlib import Path

import pytest, torch

ROOT = Path(__file__).resolve().parents[1]

def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: a test that takes more than ~5 s (deselect with -m "not slow")')

# The corpus comes from the mirror beside the clone when there is one (no network needed); see README "Data".
_mirror = ROOT.parent / 'shared' / 'data'
if not os.environ.get('DDIFF_DATA_MIRROR') and _mirror.is_dir(): os.environ['DDIFF_DATA_MIRROR'] = str(_mirror)

torch.set_num_threads(1)  # the test machines are small and shared; subprocesses get OMP_NUM_THREADS from the runner


@pytest.fixture(scope='module')
def shots(tmp_path_factory):
    "A folder for a browser test's screenshots, copied to $DDIFF_SCREENSHOTS at the end when that is set."
    d = tmp_path_factory.mktemp('screenshots')
    yield d
    if os.environ.get('DDIFF_SCREENSHOTS'):
        dst = Path(os.environ['DDIFF_SCREENSHOTS']); dst.mkdir(parents=True, exist_ok=True)
        for f in d.glob('*.png'): shutil.copy2(f, dst / f.name)
