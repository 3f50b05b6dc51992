"""The documentation site: built offline from the notebooks, served on 127.0.0.1 and opened in headless Chromium.

Every module page must show its title and an API entry for each name in the module's `__all__`; nothing may be
loaded from outside the site. Screenshots go to a temporary folder, and also to $DDIFF_SCREENSHOTS when set.
"""
import html, importlib, os, re, shutil, subprocess, tempfile
from pathlib import Path

import pytest

nbformat = pytest.importorskip('nbformat')
pytest.importorskip('mkdocs', reason='the docs site needs the dev tools (mkdocs, mkdocs-material, mkdocs-jupyter)')

from ddiff.core import project_root
from ddiff.docs import anchor, build_docs, external_refs, find_notebooks, notebook_info, serve_site

pytestmark = pytest.mark.slow

CHROMIUM = next((p for p in map(shutil.which, ('chromium', 'chromium-browser', 'google-chrome')) if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install -y chromium)")
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--disable-quic', '--hide-scrollbars', '--window-size=1280,1600']

def chromium(url: str, shot: Path, timeout: int = 120) -> str:
    "Open `url` in a fresh headless Chromium, save a screenshot to `shot` and return the rendered DOM."
    with tempfile.TemporaryDirectory(prefix='ddiff-chromium-') as profile:
        r = subprocess.run([CHROMIUM, *FLAGS, f'--user-data-dir={profile}', f'--screenshot={shot}', '--dump-dom', url],
                           capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f'chromium failed on {url}: {r.stderr[-2000:]}'
    assert shot.is_file() and shot.stat().st_size > 5_000, f'no screenshot of {url}'
    return r.stdout

def module_pages() -> list[tuple[str, str, str | None]]:
    "(page file, page title, exported module) for every module notebook."
    out = []
    for p in find_notebooks(project_root() / 'nbs')['modules']:
        info = notebook_info(nbformat.read(p, as_version=4))
        out.append((p.stem + '.html', info['title'] or p.stem, info['module']))
    return out

PAGES = module_pages()

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    return build_docs(tmp_path_factory.mktemp('docs') / 'site')

@pytest.fixture(scope='module')
def base_url(site):
    server, url = serve_site(site)
    yield url
    server.shutdown(); server.server_close()

@pytest.fixture(scope='module')
def shots(tmp_path_factory):
    d = tmp_path_factory.mktemp('screenshots')
    yield d
    if os.environ.get('DDIFF_SCREENSHOTS'):
        dst = Path(os.environ['DDIFF_SCREENSHOTS']); dst.mkdir(parents=True, exist_ok=True)
        for f in d.glob('*.png'): shutil.copy2(f, dst / f.name)

def test_site_files(site):
    assert external_refs(site) == []
    assert (site / 'index.html').is_file() and (site / 'search' / 'search_index.json').is_file()
    for page, _, _ in PAGES: assert (site / page).is_file(), page

@needs_chromium
def test_index_renders(site, base_url, shots):
    dom = chromium(base_url + 'index.html', shots / 'index.png')
    assert 'md-nav' in dom and 'md-content' in dom
    for page, title, _ in PAGES: assert f'href="{page}"' in dom, f'no link to {page} on the home page'

@needs_chromium
@pytest.mark.parametrize('page,title,module', PAGES, ids=[p for p, _, _ in PAGES])
def test_module_page_renders(site, base_url, shots, page, title, module):
    names = list(getattr(importlib.import_module(f'ddiff.{module}'), '__all__', [])) if module else []
    dom = chromium(base_url + page, shots / page.replace('.html', '.png'))
    title = html.escape(re.sub(r'[`*]', '', title), quote=False)
    assert f'<title>{title} - ' in dom, f'{page} does not have the title {title!r}'
    missing = [n for n in names if f'id="{anchor(n)}"' not in dom]
    assert not missing, f'{page} has no API entry for {missing}'
    if names: assert 'ddiff-params' in dom or 'ddiff-doc' in dom
    assert '<!-- Load mathjax -->' not in dom

DEMO_NB = [
    ('code', '#| default_exp demo_docs_fixture'),
    ('markdown', '# Demo page\n\n> A tiny notebook for the docs test.\n\nThe loss is $-\\log p(x)$; see `twice`.'),
    ('code', '#| export\ndef twice(x: int,  # a number\n         ) -> int:\n    "Twice `x`."\n    return 2 * x'),
    ('code', '#| hide\nHIDDEN_MARKER = 1'),
    ('code', 'import matplotlib\nmatplotlib.use("module://matplotlib_inline.backend_inline")\nimport matplotlib.pyplot as plt\n'
             'plt.figure(figsize=(3, 2)); plt.plot([0, 1, 4]); plt.title("demo plot"); plt.show()'),
    ('code', 'print(twice(21))'),
]

@pytest.fixture(scope='module')
def demo_site(tmp_path_factory):
    "A one-notebook project built with execute=True, so the page has a fresh plot."
    root = tmp_path_factory.mktemp('demo')
    (root / 'nbs').mkdir()
    (root / 'settings.ini').write_text('[DEFAULT]\ntitle = demo\ndescription = A demo project\n')
    (root / 'README.md').write_text('# Demo\n\nRead [the demo](nbs/00_demo.ipynb) and [the licence](LICENSE).\n')
    (root / 'LICENSE').write_text('free\n')
    cells = [nbformat.v4.new_code_cell(s) if k == 'code' else nbformat.v4.new_markdown_cell(s) for k, s in DEMO_NB]
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={'kernelspec': {'name': 'python3', 'language': 'python', 'display_name': 'python3'}}),
                   root / 'nbs' / '00_demo.ipynb')
    return build_docs(root / '_docs', execute=True, root=root)

def test_demo_site_files(demo_site):
    assert external_refs(demo_site) == []
    page = (demo_site / '00_demo.html').read_text()
    assert 'data:image/png;base64' in page and '<math' in page and 'id="twice"' in page and '>42' in page
    assert 'HIDDEN_MARKER' not in page and 'default_exp' not in page
    index = (demo_site / 'index.html').read_text()
    assert 'href="00_demo.html"' in index and 'href="files/LICENSE"' in index

@needs_chromium
def test_demo_page_renders_plot(demo_site, shots):
    server, url = serve_site(demo_site)
    try: dom = chromium(url + '00_demo.html', shots / 'demo_00_demo.png')
    finally: server.shutdown(); server.server_close()
    assert 'Demo page' in dom and 'src="data:image/png;base64' in dom and '<math' in dom
    assert 'id="twice"' in dom and '<td>a number</td>' in dom  # docments table of a module that is not importable
