"""Run All in a real browser: JupyterLab, Debian's Chromium driven by Playwright, as a student uses them.

For each chosen chapter: open the stored notebook, check that opening and saving it changes nothing,
then Edit > Clear Outputs of All Cells and Run > Run All Cells through the menus, wait for the kernel
to go idle, and read what the page shows: no error output, every code cell ran once and in order, a
cell that needs what this machine lacks shows exactly its one "Skipped: ..." line, every figure is a
loaded image, the hand-in and self-check cells ran. Screenshots go to ``$COURSE_ARTIFACTS``
(default tests/artifacts/, git-ignored).

Which chapters: ``COURSE_BROWSER_CHAPTERS`` -- a comma-separated list (default ``01_export,02_build``,
what CI runs), ``all``, or ``none``. Every chapter:

    COURSE_BROWSER_CHAPTERS=all python -m pytest tests/test_browser.py

Set-up: Playwright for Python is in the dev extra; its own browser download is not used. The test
uses /usr/bin/chromium and installs Debian's ``chromium`` with apt-get where it is missing (as root),
and skips, saying why, only when that fails.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
_spec = importlib.util.spec_from_file_location("build_notebooks", REPO / "tools" / "build_notebooks.py")
bn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bn)
CHAPTERS = bn.source_names()

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DEFAULT_CHAPTERS = "01_export,02_build"
CHAPTER_TIMEOUT_S = 1800              # Run All of the slowest chapter on a busy 2-core machine, with room


def chosen_chapters() -> list[str]:
    raw = os.environ.get("COURSE_BROWSER_CHAPTERS", DEFAULT_CHAPTERS).strip()
    if raw.lower() in ("", "none"):
        return []
    names = CHAPTERS if raw.lower() == "all" else [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHAPTERS]
    if unknown:
        raise pytest.UsageError(f"COURSE_BROWSER_CHAPTERS: unknown chapter {unknown[0]!r}; "
                                f"expected all, none or some of {', '.join(CHAPTERS)}")
    return names


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("COURSE_ARTIFACTS", REPO / "tests" / "artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --- set-up: Chromium, Playwright, JupyterLab -------------------------------------------------

@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt-get where it is missing; skip (saying why) if that fails."""
    if not chosen_chapters():
        pytest.skip("COURSE_BROWSER_CHAPTERS=none")
    if not Path(CHROMIUM).exists():
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            pytest.skip(f"{CHROMIUM} is missing and cannot be installed here (needs apt-get as root): "
                        "apt-get install chromium")
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                                  env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if done.returncode != 0:
                pytest.skip(f"installing Debian's chromium failed ({' '.join(cmd)}): {done.stderr.strip()[-300:]}")
    return CHROMIUM


@pytest.fixture(scope="session")
def browser(chromium, tmp_path_factory):
    """A Chromium page driven by Playwright (a fresh profile), 1400x900."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is in the dev extra: pip install -e '.[dev]'")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=chromium, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 900})
        try:
            yield context
        finally:
            context.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def jupyterlab(tmp_path_factory):
    """JupyterLab on 127.0.0.1 with a token on a free port, serving copies of the chapters.

    The copies sit in <tmp>/notebooks next to a link to docs/ (chapters 3 and 4 read ../docs/bench), so
    a run never touches the stored notebooks. Its own Jupyter and IPython folders; settings: no news
    or update checks (their pop-ups cover the page).
    """
    pytest.importorskip("jupyterlab", reason="JupyterLab is in the dev extra: pip install -e '.[dev]'")
    root = tmp_path_factory.mktemp("lab")
    (root / "notebooks").mkdir()
    (root / "docs").symlink_to(REPO / "docs", target_is_directory=True)
    settings = root / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"checkForUpdates": False, "fetchNews": "false"}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "COURSE_PROGRESS"))}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]),
               JUPYTER_CONFIG_DIR=str(root / "config"), JUPYTER_DATA_DIR=str(root / "data"),
               JUPYTER_RUNTIME_DIR=str(root / "runtime"), IPYTHONDIR=str(root / "ipython"))
    log = (root / "jupyterlab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root / 'notebooks'}",
         f"--LabApp.user_settings_dir={root / 'settings'}", f"--LabApp.workspaces_dir={root / 'workspaces'}",
         "--LabApp.expose_app_in_browser=True", *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start: {(root / 'jupyterlab.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield {"base": base, "token": token, "root": root / "notebooks", "log": root / "jupyterlab.log"}
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)      # the server and the kernels it started
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()


# --- reading the page ---------------------------------------------------------------------------

KERNEL_STATE = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.sessionContext) return {ready: false};
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const prompts = [...panel.content.node.querySelectorAll('.jp-InputPrompt')].map(e => e.textContent);
  return {ready: !!kernel, status: kernel ? kernel.status : 'none', queued: prompts.filter(t => t.includes('*')).length,
          dirty: panel.context.model.dirty,
          dirtyTab: document.querySelectorAll('.lm-TabBar-tab.jp-mod-current.jp-mod-dirty').length};
}"""

# what the page shows, code cell by code cell: the model's outputs and the DOM's text and images
READ_CELLS = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  const nodes = [...panel.content.node.querySelectorAll('.jp-Cell.jp-CodeCell')];
  const cells = [];
  for (let i = 0, k = 0; i < panel.content.model.cells.length; i++) {
    const model = panel.content.model.cells.get(i);
    if (model.type !== 'code') continue;
    const node = nodes[k++];
    const outputs = node.querySelectorAll('.jp-OutputArea-output');
    cells.push({
      count: model.executionCount,
      outputs: model.outputs.toJSON().map(o => ({type: o.output_type, name: o.name || null,
                                                 text: o.text || null, mimes: Object.keys(o.data || {})})),
      prompt: node.querySelector('.jp-InputPrompt').textContent.trim(),
      texts: [...outputs].map(e => e.textContent),
      images: [...node.querySelectorAll('.jp-OutputArea-output img')].map(
        img => ({loaded: img.complete && img.naturalWidth > 0, width: img.naturalWidth})),
      widgets: node.querySelectorAll('.jp-OutputArea-output .widget-progress, .jp-OutputArea-output .jupyter-widgets').length,
      iframes: node.querySelectorAll('.jp-OutputArea-output iframe').length,
    });
  }
  return cells;
}"""


def click_menu(page, menu: str, item: str) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=menu).first.click()
    page.locator(".lm-Menu-item:visible .lm-Menu-itemLabel", has_text=item).first.click()


def wait_for(page, condition, timeout_s: float, what: str, stable: int = 2):
    """Poll KERNEL_STATE until ``condition(state)`` holds ``stable`` times in a row (1 s apart)."""
    deadline, hits, state = time.monotonic() + timeout_s, 0, None
    while time.monotonic() < deadline:
        state = page.evaluate(KERNEL_STATE)
        hits = hits + 1 if condition(state) else 0
        if hits >= stable:
            return state
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; last state {state}")


def open_notebook(page, lab, name: str):
    page.goto(f"{lab['base']}/lab/tree/{name}.ipynb?reset&token={lab['token']}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=120_000)
    return wait_for(page, lambda s: s.get("ready") and s["status"] == "idle", 180, f"{name}'s kernel to start")


def lacking_here() -> set[str]:
    have, _ = bn.machine_capabilities()
    return set(bn.CAPABILITIES) - have


# --- the test -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", chosen_chapters() or ["none"])
def test_run_all_in_jupyterlab(name, browser, jupyterlab, request):
    lab, artifacts = jupyterlab, artifacts_dir()
    stored_path = NOTEBOOKS / f"{name}.ipynb"
    copy = lab["root"] / stored_path.name
    shutil.copy(stored_path, copy)
    stored = nbformat.read(stored_path, as_version=4)
    page = browser.new_page()
    started = time.monotonic()
    try:
        # 1. opened and saved unchanged, the notebook is what the build tool wrote
        state = open_notebook(page, lab, name)
        same_python = stored.metadata.get("language_info", {}).get("version") == ".".join(map(str, sys.version_info[:3]))
        if same_python:
            assert not state["dirty"] and not state["dirtyTab"], f"{name} is marked modified as soon as it opens"
        before = copy.stat().st_mtime_ns
        click_menu(page, "File", "Save Notebook")
        deadline = time.monotonic() + 60
        while copy.stat().st_mtime_ns == before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert copy.stat().st_mtime_ns != before, "File > Save Notebook did not write the file"
        assert bn.source_mismatch(NOTEBOOKS / "src" / f"{name}.py", copy) is None, bn.source_mismatch(
            NOTEBOOKS / "src" / f"{name}.py", copy)
        if same_python:
            assert copy.read_bytes() == stored_path.read_bytes(), f"saving {name} unchanged in JupyterLab changed it"

        # 2. Run All, from empty outputs, through the menus
        click_menu(page, "Edit", "Clear Outputs of All Cells")
        click_menu(page, "Run", "Run All Cells")
        wait_for(page, lambda s: s["queued"] > 0 or s["status"] == "busy", 60, "Run All to start", stable=1)
        wait_for(page, lambda s: s["status"] == "idle" and s["queued"] == 0, CHAPTER_TIMEOUT_S, f"Run All of {name}",
                 stable=3)
        seconds = time.monotonic() - started
        cells = page.evaluate(READ_CELLS)
        screenshots(page, name, cells, artifacts)
    finally:
        page.close()
    request.node.user_properties.append(("run_all_seconds", round(seconds, 1)))
    print(f"{name}: Run All in JupyterLab took {seconds:.0f} s (opening and saving included)")
    check_cells(name, stored, cells)


def check_cells(name: str, stored, cells: list[dict]) -> None:
    from course_lib.notebook import SKIP_PREFIX

    code = [c for c in stored.cells if c.cell_type == "code"]
    assert len(cells) == len(code), f"{name}: the page shows {len(cells)} code cells, the notebook has {len(code)}"
    lacking = lacking_here()
    for k, (cell, seen) in enumerate(zip(code, cells)):
        where = f"{name} Cell {k} ({cell.source.splitlines()[0][:50]!r})"
        errors = [o for o in seen["outputs"] if o["type"] == "error"]
        assert not errors and not any("Traceback (most recent call last)" in t for t in seen["texts"]), (
            f"{where} shows an error: {seen['texts']}")
        assert seen["count"] == k + 1 and seen["prompt"] == f"[{k + 1}]:", (
            f"{where}: expected it to run as [{k + 1}] in Run All, the page shows {seen['prompt']}")
        assert not any("Error displaying widget" in t for t in seen["texts"]), f"{where}: a widget failed"
        needs = set(bn.cell_needs(cell.source))
        shown = [o for o in seen["outputs"] if not (o["type"] == "stream" and o["name"] == "stderr")]
        skip_texts = [t for t in seen["texts"] if t.startswith(SKIP_PREFIX)]
        if needs & lacking:
            assert len(shown) == 1 and len(skip_texts) == 1 and skip_texts[0].strip().count("\n") == 0, (
                f"{where} needs {sorted(needs & lacking)}, missing here: expected its one skip line, got {seen['texts']}")
            continue
        assert not skip_texts, f"{where} printed a skip line on a machine that has {sorted(needs)}"
        figures = sum("image/png" in o.get("data", {}) for o in cell.outputs)
        if figures:
            assert len(seen["images"]) == figures and all(i["loaded"] for i in seen["images"]), (
                f"{where}: stored with {figures} figure(s), the page shows images {seen['images']}")
        if "show_in_netron(" in cell.source:
            assert seen["iframes"] == 1, f"{where}: Netron's view is not on the page"
    last = cells[-1]
    assert any("self-check passed" in t for t in last["texts"]), f"{name}: the self-check shows {last['texts']}"
    hand_in = [seen for cell, seen in zip(code, cells) if "SEED, STUDENT =" in cell.source]
    assert all(seen["texts"] for seen in hand_in), f"{name}: a hand-in cell shows nothing"


def screenshots(page, name: str, cells: list[dict], artifacts: Path) -> None:
    """The window at the end, and the first skip line, figure, progress widget, Netron view and the self-check."""
    from course_lib.notebook import SKIP_PREFIX

    nodes = page.locator(".jp-Cell.jp-CodeCell")
    picks = {
        "skip-line": next((k for k, c in enumerate(cells) if any(t.startswith(SKIP_PREFIX) for t in c["texts"])), None),
        "figure": next((k for k, c in enumerate(cells) if c["images"]), None),
        "progress": next((k for k, c in enumerate(cells) if c["widgets"]), None),
        "netron": next((k for k, c in enumerate(cells) if c["iframes"]), None),
        "self-check": len(cells) - 1,
    }
    for what, k in picks.items():
        if k is not None:
            nodes.nth(k).scroll_into_view_if_needed()
            if what == "netron":                    # Netron's first-run notice, then let it draw the graph
                accept = page.frame_locator(".jp-OutputArea-output iframe").first.get_by_text("Accept", exact=True)
                try:
                    accept.click(timeout=10_000)
                except Exception:  # noqa: BLE001  (a Netron without the notice: nothing to click)
                    pass
                time.sleep(5)
            nodes.nth(k).screenshot(path=str(artifacts / f"{name}_{what}.png"))
    page.screenshot(path=str(artifacts / f"{name}_window.png"))
