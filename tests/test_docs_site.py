"""The documentation site: built offline from the executed notebooks, served on 127.0.0.1 and opened in headless Chromium.

Every module page must show its title and an API entry for each function and class in the module's `__all__`;
every executed page whose notebook plots must show at least one image; the example run reports get pages with
their figures; nothing may be loaded from outside the site. Screenshots go to a temporary folder, and also to
$DDIFF_SCREENSHOTS when set.

Executing all notebooks takes several minutes on 2 cores, so by default the site is built executing only
`CI_EXECUTE` (two quick notebooks with plots), with `#| slow` cells skipped; the other pages come from the
project's docs cache (`.cache/docs/`, filled by `ddiff docs`) or show a "Not executed" note. Set
DDIFF_DOCS_EXECUTE=all to execute every notebook (slow cells included) and check every page's figures.
"""
import html, importlib, inspect, os, re, shutil, subprocess, tempfile
from pathlib import Path

import pytest

nbformat = pytest.importorskip('nbformat')
pytest.importorskip('mkdocs', reason='the docs site needs the dev tools (mkdocs, mkdocs-material, mkdocs-jupyter)')

from ddiff.core import project_root
from ddiff.docs import anchor, build_docs, external_refs, find_notebooks, notebook_info, serve_site

pytestmark = pytest.mark.slow

CI_EXECUTE = ['02_masking', '03_stages']
FULL = os.environ.get('DDIFF_DOCS_EXECUTE') == 'all'

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

def chromium_at(site: Path, base_url: str, page: str, fragment: str, shot: Path):
    "Screenshot of `page` scrolled to `#fragment`: in an iframe, since headless Chromium paints a scrolled page blank."
    wrapper = site / f'_shot_{page}'
    wrapper.write_text(f'<!doctype html><body style="margin:0"><iframe src="{page}#{fragment}" style="border:0;width:1280px;height:1600px"></iframe>')
    chromium(base_url + wrapper.name, shot)

def plots(nb) -> bool:
    "Whether the notebook's own (not exported) code draws: a `plt.<fn>(` call or a `plot_<name>(` helper."
    return any(c.cell_type == 'code' and not re.search(r'^#\|\s*export', c.source, re.M)
               and re.search(r'\bplt\.\w+\(|\bplot_\w+\(', c.source) for c in nb.cells)

def module_pages() -> list[tuple[str, str, str | None, bool]]:
    "(page file, page title, exported module, makes a plot) for every module notebook."
    out = []
    for p in find_notebooks(project_root() / 'nbs')['modules']:
        nb = nbformat.read(p, as_version=4)
        info = notebook_info(nb)
        out.append((p.stem + '.html', info['title'] or p.stem, info['module'], plots(nb)))
    return out

PAGES = module_pages()
EXAMPLES = sorted(p.parent.name for p in (project_root() / 'outputs' / 'examples').glob('*/report.md'))

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    return build_docs(tmp_path_factory.mktemp('docs') / 'site', execute=True if FULL else CI_EXECUTE,
                      skip_flags=() if FULL else ('slow',))

@pytest.fixture(scope='module')
def base_url(site):
    server, url = serve_site(site)
    yield url
    server.shutdown(); server.server_close()

def test_site_files(site):
    assert external_refs(site) == []
    assert (site / 'index.html').is_file() and (site / 'search' / 'search_index.json').is_file()
    for page, _, _, _ in PAGES: assert (site / page).is_file(), page
    for name in CI_EXECUTE: assert 'Not executed' not in (site / f'{name}.html').read_text(), f'{name} was not executed'
    for page in (site / 'experiments').glob('*.html'): assert 'Experiment template' in page.read_text()
    if FULL:
        for page, _, _, _ in PAGES: assert 'Not executed' not in (site / page).read_text(), f'{page} failed to execute'

@needs_chromium
def test_index_renders(site, base_url, shots):
    dom = chromium(base_url + 'index.html', shots / 'index.png')
    assert 'md-nav' in dom and 'md-content' in dom
    for page, _, _, _ in PAGES: assert f'href="{page}"' in dom, f'no link to {page} on the home page'
    for name in EXAMPLES: assert f'href="examples/{name}/report.html"' in dom, f'no link to the {name} report'

@needs_chromium
@pytest.mark.parametrize('page,title,module,makes_plot', PAGES, ids=[p[0] for p in PAGES])
def test_module_page_renders(site, base_url, shots, page, title, module, makes_plot):
    mod = importlib.import_module(f'ddiff.{module}') if module else None
    names = [n for n in getattr(mod, '__all__', []) if inspect.isfunction(getattr(mod, n)) or inspect.isclass(getattr(mod, n))]
    dom = chromium(base_url + page, shots / page.replace('.html', '.png'))
    title = html.escape(re.sub(r'[`*]', '', title), quote=False)
    assert f'<title>{title} - ' in dom, f'{page} does not have the title {title!r}'
    missing = [n for n in names if f'id="{anchor(n)}"' not in dom]
    assert not missing, f'{page} has no API entry for {missing}'
    assert '<!-- Load mathjax -->' not in dom
    if makes_plot and 'Not executed' not in dom:
        img = re.search(r'<img[^>]+src="data:image/png;base64', dom)
        assert img, f'{page} was executed and plots, but shows no image'
        cells = re.findall(r'\bid="(cell-id=[^"]+)"', dom[:img.start()])  # a second screenshot, at the cell of the first figure
        if cells: chromium_at(site, base_url, page, cells[-1], shots / page.replace('.html', '_figure.png'))

@needs_chromium
@pytest.mark.parametrize('name', EXAMPLES)
def test_example_report_renders(site, base_url, shots, name):
    dom = chromium(base_url + f'examples/{name}/report.html', shots / f'example_{name}.png')
    imgs = re.findall(r'<img[^>]+src="([^"]+)"', dom)
    assert imgs, f'the {name} report shows no figure'
    for src in imgs: assert (site / 'examples' / name / src).is_file(), f'the {name} report shows {src}, which is not in the site'

DEMO_NB = [
    ('code', '#| default_exp demo_docs_fixture'),
    ('markdown', '# Demo page\n\n> A tiny notebook for the docs test.\n\nThe loss is $-\\log p(x)$; see `twice`.\n\n## Using `twice` twice'),
    ('code', '#| export\ndef twice(x: int,  # a number\n         ) -> int:\n    "Twice `x`."\n    return 2 * x'),
    ('code', '#| hide\nHIDDEN_MARKER = 1'),
    ('code', 'import matplotlib.pyplot as plt\nplt.figure(figsize=(3, 2)); plt.plot([0, 1, 4]); plt.title("demo plot"); plt.show()'),
    ('code', 'print(twice(21))'),
]

def _write_nb(path: Path, cells: list[tuple[str, str]]):
    path.parent.mkdir(parents=True, exist_ok=True)
    nb_cells = [nbformat.v4.new_code_cell(s) if k == 'code' else nbformat.v4.new_markdown_cell(s) for k, s in cells]
    nbformat.write(nbformat.v4.new_notebook(cells=nb_cells, metadata={'kernelspec': {'name': 'python3', 'language': 'python', 'display_name': 'python3'}}), path)

@pytest.fixture(scope='module')
def demo_site(tmp_path_factory):
    "A small project built with execution: a page with a plot, a notebook that fails, an experiment template."
    root = tmp_path_factory.mktemp('demo')
    (root / 'settings.ini').write_text('[DEFAULT]\ntitle = demo\ndescription = A demo project\n')
    (root / 'README.md').write_text('# Demo\n\nRead [the demo](nbs/00_demo.ipynb) and [the licence](LICENSE).\n')
    (root / 'LICENSE').write_text('free\n')
    _write_nb(root / 'nbs' / '00_demo.ipynb', DEMO_NB)
    _write_nb(root / 'nbs' / '01_broken.ipynb', [('markdown', '# Broken\n\n> Needs a checkpoint.'), ('code', 'x = 1'),
                                                 ('code', 'raise FileNotFoundError("no checkpoint runs/x/best.pt")')])
    _write_nb(root / 'nbs' / 'experiments' / 'exp.ipynb', [('markdown', '# An experiment'), ('code', 'open("ran.txt", "w")')])
    (root / 'outputs' / 'examples' / 'tiny').mkdir(parents=True)
    (root / 'outputs' / 'examples' / 'tiny' / 'report.md').write_text('# ddiff run: tiny\n\n![curve](curve.png)\n')
    shutil.copy2(project_root() / 'outputs' / 'examples' / 'quickstart' / 'loss_curves.png', root / 'outputs' / 'examples' / 'tiny' / 'curve.png')
    return build_docs(root / '_docs', root=root)

def test_demo_site_files(demo_site):
    root = demo_site.parent
    assert external_refs(demo_site) == []
    page = (demo_site / '00_demo.html').read_text()
    assert 'data:image/png;base64' in page and '<math' in page and 'id="twice"' in page and '>42' in page
    assert 'HIDDEN_MARKER' not in page and 'default_exp' not in page and 'Not executed' not in page
    broken = html.unescape((demo_site / '01_broken.html').read_text())
    assert 'Not executed' in broken and '01_broken.ipynb: cell 2 (<code>raise FileNotFoundError' in broken
    assert 'raised FileNotFoundError: no checkpoint runs/x/best.pt' in broken
    assert not (root / 'nbs' / 'experiments' / 'ran.txt').exists(), 'an experiment template was executed'
    assert 'Experiment template' in (demo_site / 'experiments' / 'exp.html').read_text()
    assert (demo_site / 'examples' / 'tiny' / 'report.html').is_file() and (demo_site / 'examples' / 'tiny' / 'curve.png').is_file()
    assert len(list((root / '.cache' / 'docs').glob('*.ipynb'))) == 1  # the demo notebook; failures are not cached
    index = (demo_site / 'index.html').read_text()
    assert 'href="00_demo.html"' in index and 'href="files/LICENSE"' in index and 'href="examples/tiny/report.html"' in index

@needs_chromium
def test_demo_page_renders_plot(demo_site, shots):
    server, url = serve_site(demo_site)
    try: dom = chromium(url + '00_demo.html', shots / 'demo_00_demo.png')
    finally: server.shutdown(); server.server_close()
    assert 'Demo page' in dom and 'src="data:image/png;base64' in dom and '<math' in dom
    assert 'id="twice"' in dom and '# a number' in dom  # docments of a module that is not importable
    toc = dom[dom.index('Table of contents'):]
    assert re.search(r'href="#using-twice-twice"[^>]*>\s*<span class="md-ellipsis">\s*Using <code>twice</code> twice', toc), \
        'the table of contents lost the inline code of a heading'
