"""The explorer used live: JupyterLab on 127.0.0.1, nbs/20_explorer.ipynb (a copy) opened in headless Chromium.

Playwright for Python drives Debian's `chromium` (`executable_path`; nothing downloads a browser). The test runs all
cells, changes controls, checks that the view and its plots change with no widget error, that only the text rows
scroll sideways at 1280x800 with the file browser open, that the YAML export appears, and that a reopened notebook
without its kernel still shows the last view (the static snapshot). It prints the time from each control change to the
complete new view in the page, and saves screenshots to its tmp folder (and to $DDIFF_SCREENSHOTS when set).
"""
import json, os, secrets, shutil, socket, statistics, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in map(shutil.which, ('chromium', 'chromium-browser')) if p), None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason='headless Chromium is not installed (Debian: apt-get install -y chromium)')]
playwright_api = pytest.importorskip('playwright.sync_api', reason='Playwright for Python is not installed (pip install -e ".[dev]")')
pytest.importorskip('jupyterlab', reason='JupyterLab is not installed (pip install -e ".[dev]")')

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def wait_http(url: str, proc: subprocess.Popen, timeout: float = 90):
    "Poll `url` until it answers 200 (or the server exits)."
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None: raise RuntimeError(f'jupyter lab exited with {proc.returncode}')
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError: pass
        time.sleep(0.3)
    raise TimeoutError(f'{url} did not answer within {timeout}s')

@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    "A JupyterLab server on 127.0.0.1 with a token, its own config/data folders and a copy of the explorer notebook."
    d = tmp_path_factory.mktemp('lab')
    work = d / 'work'; work.mkdir()
    nb = json.loads((ROOT / 'nbs' / '20_explorer.ipynb').read_text())
    nb['metadata']['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3 (ipykernel)', 'language': 'python'}  # no kernel dialog
    (work / 'explorer.ipynb').write_text(json.dumps(nb))
    settings = d / 'settings' / '@jupyterlab' / 'apputils-extension'; settings.mkdir(parents=True)
    (settings / 'notification.jupyterlab-settings').write_text(json.dumps({'fetchNews': 'false', 'checkForUpdates': False}))
    nbset = d / 'settings' / '@jupyterlab' / 'notebook-extension'; nbset.mkdir(parents=True)
    (nbset / 'tracker.jupyterlab-settings').write_text(json.dumps({'windowingMode': 'none'}))  # every cell stays in the page
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, 'DDIFF_ROOT': str(ROOT), 'DDIFF_DATA': str(d / 'data'), 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg',
           'PYTHONPATH': os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH', '')) if p),
           'JUPYTER_CONFIG_DIR': str(d / 'config'), 'JUPYTER_DATA_DIR': str(d / 'jdata'), 'JUPYTER_RUNTIME_DIR': str(d / 'runtime'),
           'JUPYTERLAB_SETTINGS_DIR': str(d / 'settings'), 'JUPYTERLAB_WORKSPACES_DIR': str(d / 'workspaces'), 'IPYTHONDIR': str(d / 'ipython')}
    cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--allow-root', '--ip=127.0.0.1', f'--port={port}',
           f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={work}', '--LabApp.expose_app_in_browser=True',
           '--LabApp.news_url=', '--ServerApp.port_retries=0']
    log = open(d / 'lab.log', 'w')
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f'http://127.0.0.1:{port}'
        wait_http(f'{base}/api/status?token={token}', proc)
        yield dict(base=base, token=token, dir=work, log=d / 'lab.log')
    finally:
        proc.terminate()
        try: proc.wait(15)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        log.close()

# JS: remember when the user acted (capture phase, before any widget handler) ...
ARM = """() => { window.__ddT0 = null; for (const ev of ['change', 'keydown', 'click', 'input'])
  document.addEventListener(ev, () => { if (window.__ddT0 === null) window.__ddT0 = performance.now(); }, true); }"""
# ... and poll every frame until the view has a newer id and is no longer busy: then the complete new view is in the page.
DONE = """(prev) => { const v = document.querySelector('.dd-explorer .dd-view');
  if (!v || +v.dataset.view <= prev || document.querySelector('.dd-explorer.dd-busy') || window.__ddT0 === null) return false;
  window.__ddLatency = performance.now() - window.__ddT0; window.__ddT0 = null; return true; }"""

# JS: the elements of the explorer that stick out on the right (for the failure message)
WIDE = """() => { const box = document.querySelector('.dd-explorer'), r = box.getBoundingClientRect(), out = [`box ${r.left}-${r.right}`];
  for (const e of box.querySelectorAll('*')) { const q = e.getBoundingClientRect();
    if (q.right > r.right + 1 && out.length < 12) out.push(`${e.tagName}.${e.className.baseVal ?? e.className} ${q.left.toFixed(0)}-${q.right.toFixed(0)}`); }
  return out.join('; '); }"""

def accept_kernel(page, wait: float = 4_000):
    "Answer JupyterLab's 'Select Kernel' dialog (if it comes) with the default Python kernel."
    try: page.locator('.jp-Dialog button:has-text("Select")').click(timeout=wait)
    except playwright_api.TimeoutError: pass

def view_id(page) -> int:
    return int(page.locator('.dd-explorer .dd-view').get_attribute('data-view'))

def control(page, kind: str, label: str):
    "The input element of the ipywidget `kind` (dropdown, slider, ...) whose description is `label`."
    return page.locator(f'.dd-explorer .widget-{kind}:has(> label:text-is("{label}"))')

def act(page, what: str, action, lat: dict, timeout: float = 30_000):
    "Do `action`, wait for the complete new view, record the latency; return (view html before, after)."
    before, prev = page.locator('.dd-explorer .dd-view').inner_html(), view_id(page)
    page.evaluate('() => { window.__ddT0 = null; }')
    action()
    page.wait_for_function(DONE, arg=prev, polling='raf', timeout=timeout)
    lat[what] = page.evaluate('() => window.__ddLatency') / 1000
    return before, page.locator('.dd-explorer .dd-view').inner_html()

def plots(html_: str) -> str:
    return html_[html_.index('class="dd-plots"'):]

def test_explorer_live(lab, shots):
    url = f"{lab['base']}/lab/tree/explorer.ipynb?token={lab['token']}"
    lat = {}
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=['--no-sandbox', '--disable-gpu'])
        page = browser.new_page(viewport={'width': 1280, 'height': 800})
        errors = []
        page.on('pageerror', lambda e: errors.append(str(e)))
        try: drive(page, url, lab, shots, lat, errors)
        except Exception:
            page.screenshot(path=shots / 'explorer-failure.png')
            print(f"screenshot of the failure: {shots / 'explorer-failure.png'}\nlab log:\n{lab['log'].read_text()[-3000:]}")
            raise
        finally: browser.close()
    secs = list(lat.values())
    print('change -> complete new view in the browser (s): ' + ', '.join(f'{k} {v:.3f}' for k, v in lat.items()))
    print(f'median {statistics.median(secs):.3f} s, max {max(secs):.3f} s over {len(secs)} changes; screenshots in {shots}')

def drive(page, url, lab, shots, lat, errors):
    "Open the notebook, run it, drive the explorer and reopen it without the kernel."
    page.goto(url)
    print('\nopened', url.split('?')[0])
    page.wait_for_selector('.jp-Notebook', timeout=60_000)
    page.wait_for_function("() => window.jupyterapp && document.querySelector('.jp-Notebook .jp-Cell')", timeout=60_000)
    page.evaluate("() => { window.jupyterapp.commands.execute('filebrowser:activate'); }")  # the file browser open, as a user has it
    accept_kernel(page)
    t0 = time.time()
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    page.locator('.jp-OutputArea-output:has-text("one change: median")').wait_for(timeout=90_000)  # the last cell ran
    page.wait_for_selector('.dd-explorer .dd-view', state='attached', timeout=10_000)
    print(f'\nall cells ran in {time.time() - t0:.1f} s')
    page.evaluate(ARM)
    page.locator('.dd-explorer').scroll_into_view_if_needed()
    page.screenshot(path=shots / 'explorer-start.png')
    page.locator('.dd-explorer .dd-head').first.scroll_into_view_if_needed()
    page.screenshot(path=shots / 'explorer-controls.png')
    assert page.locator('.dd-snapshot').count() == 1 and not page.locator('.dd-snapshot').is_visible()  # hidden while live

    # layout: at 1280x800 with the file browser open the controls wrap; only the text rows may scroll sideways
    box = page.locator('.dd-explorer')
    assert box.evaluate('e => e.scrollWidth <= e.clientWidth + 1'), f'the explorer scrolls sideways: {page.evaluate(WIDE)}'
    out = page.locator('.jp-OutputArea-output:has(.dd-explorer)')
    assert out.evaluate('e => e.scrollWidth <= e.clientWidth + 1'), 'the output area scrolls sideways'
    right = box.bounding_box()['x'] + box.bounding_box()['width']
    for lbl in ('recipe', 'schedule', 'type'):
        b = control(page, 'dropdown', lbl).bounding_box()
        assert b['x'] + b['width'] <= right + 1, f'the {lbl} dropdown is cut'
    assert page.locator('.dd-explorer .dd-rows').evaluate('e => e.scrollWidth > e.clientWidth'), 'the text rows should scroll, not wrap'

    # at least three controls: each changes the view and its plots
    b, a = act(page, 'recipe (dropdown)', lambda: control(page, 'dropdown', 'recipe').locator('select').select_option('char_random_replacement'), lat)
    assert b != a and plots(b) != plots(a) and 'stroke-width="2.5"' in a       # kinds now marked against the mixture
    assert not control(page, 'slider', 'random').locator('.noUi-target').evaluate('e => e.hasAttribute("disabled")')
    handle = control(page, 'slider', 'target_masked_ratio').locator('.noUi-handle')
    b, a = act(page, 'target_masked_ratio (slider, key)', lambda: (handle.focus(), page.keyboard.press('PageUp')), lat)
    assert plots(b) != plots(a)
    b, a = act(page, 'new sample (button)', lambda: page.get_by_role('button', name='new sample').click(), lat)
    assert plots(b) != plots(a)
    b, a = act(page, 'fragment weight (slider, key)',
               lambda: (control(page, 'slider', 'fragment').locator('.noUi-handle').focus(), page.keyboard.press('PageUp')), lat)
    assert b != a
    b, a = act(page, 'stage type (dropdown)', lambda: control(page, 'dropdown', 'type').locator('select').select_option('span'), lat)
    assert plots(b) != plots(a) and control(page, 'slider', 'spans_count').is_visible()
    b, a = act(page, 'schedule (dropdown)', lambda: control(page, 'dropdown', 'schedule').locator('select').select_option('stages/complex.yaml'), lat)
    assert 'dd-schedule-view' in a and plots(b) != plots(a)
    b, a = act(page, 'next stage (button)', lambda: page.get_by_role('button', name='▶').click(), lat)
    assert plots(b) != plots(a) and 'p2_probability": 0.1' in a
    b, a = act(page, 'compare (dropdown)', lambda: control(page, 'dropdown', 'compare with').locator('select').select_option('stages/editing.yaml'), lat)
    assert a.count('dd-schedule-view') == 2
    for i in range(4):  # a few more slider steps for the figures
        act(page, f'target_masked_ratio step {i}', lambda: (handle.focus(), page.keyboard.press('PageUp')), lat)
    assert page.locator('.dd-explorer .dd-note').count(), 'rows over half masked take no fragments: the view must say so'
    assert page.locator('.dd-explorer .dd-head').count() == 3 and page.locator('.dd-explorer .dd-caption').count() >= 5
    page.get_by_role('button', name='export YAML').click()
    page.wait_for_function("() => [...document.querySelectorAll('.dd-explorer textarea')].some(t => t.value.includes('train_stages'))")
    assert not page.locator('.jp-OutputArea-output:has-text("Error displaying widget")').count(), 'a widget failed to display'
    assert not page.locator('.dd-explorer .dd-error').count()
    assert not [e for e in errors if 'widget' in e.lower()], errors
    page.locator('.dd-explorer .dd-view').scroll_into_view_if_needed()
    page.screenshot(path=shots / 'explorer-after.png')
    page.locator('.dd-explorer').screenshot(path=shots / 'explorer-widget.png')
    last = view_id(page)

    # reopened without the kernel: the saved notebook shows the static snapshot of the last view
    page.evaluate("() => { window.jupyterapp.commands.execute('docmanager:save'); }")
    page.wait_for_function("() => !document.querySelector('.jp-mod-dirty')", timeout=20_000)
    for k in json.load(urllib.request.urlopen(f"{lab['base']}/api/kernels?token={lab['token']}")):
        req = urllib.request.Request(f"{lab['base']}/api/kernels/{k['id']}?token={lab['token']}", method='DELETE')
        urllib.request.urlopen(req).close()
    page.reload()
    accept_kernel(page)
    snap = page.locator('.dd-snapshot')
    snap.first.wait_for(timeout=60_000)
    snap.first.scroll_into_view_if_needed()
    assert snap.first.is_visible() and f'view {last},' in snap.first.inner_text()
    assert snap.first.locator('.dd-view svg').count() >= 3
    page.screenshot(path=shots / 'explorer-reopened.png')
    page.locator('.dd-snapshot').first.scroll_into_view_if_needed()
    page.screenshot(path=shots / 'explorer-reopened-top.png')
