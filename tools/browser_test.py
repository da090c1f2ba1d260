"""Open chapter 04 in JupyterLab in headless Chromium, run all cells and check what a learner sees.

    python tools/browser_test.py                    # the check (`make browser-test`)
    python tools/browser_test.py --break widgets    # the same, with the widget manager disabled: must fail
    python tools/browser_test.py --break figures    # the same, with matplotlib on the Agg backend: must fail

It starts JupyterLab on 127.0.0.1 (a free port, a random token, a fresh config folder) in a temporary
folder that holds a copy of the chapter, so the saved notebook in the repository never changes. It
drives Debian's Chromium (/usr/bin/chromium) through playwright with a fresh profile, lets no request
leave 127.0.0.1, picks the kernel, runs all cells from the Run menu and checks that

  * every code cell ran, with no traceback, and the chapter's own self-checks print what they should;
  * a figure is shown: an <img> output holding a PNG with a nonzero size;
  * the step viewer is live: dragging its slider changes the event line and the drawn block state,
    both computed by the kernel in response.

Screenshots and the server log go to artifacts/browser-test/. Every process it started (browser,
server and kernel) is stopped before it exits, also when a check fails.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
CHAPTER = ROOT / "notebooks" / "04_block_tables.ipynb"
ARTIFACTS = ROOT / "artifacts" / "browser-test"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WIDGET_MANAGER = "@jupyter-widgets/jupyterlab-manager"
# Lines the chapter prints when its self-checks hold.
EXPECTED_TEXT = ["30 layers, 3 KV heads of dim 64", "all blocks free at the end: True", "all refcounts 0: True"]
SERVER_START_TIMEOUT_S = 90
RUN_ALL_TIMEOUT_S = 150
WIDGET_RESPONSE_TIMEOUT_S = 30


class CheckFailed(AssertionError):
    """A check of what the page shows failed."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prepare_workspace(folder: Path, break_mode: str | None) -> dict[str, str]:
    """Copy the chapter into `folder`, write a fresh Jupyter config, and return the server's environment."""
    (folder / "notebooks").mkdir(parents=True)
    (folder / "figures").mkdir()  # the chapter saves ../figures/04_block_tables.png
    shutil.copy2(CHAPTER, folder / "notebooks" / CHAPTER.name)

    # The news announcements plugin would offer to fetch a feed from the web, so it is off.
    # The widget manager is disabled only to show that the check fails without it.
    disabled = {"@jupyterlab/apputils-extension:announcements": True}
    if break_mode == "widgets":
        disabled[WIDGET_MANAGER] = True
    labconfig = folder / "config" / "labconfig"
    labconfig.mkdir(parents=True)
    (labconfig / "page_config.json").write_text(json.dumps({"disabledExtensions": disabled}), encoding="utf-8")

    env = dict(os.environ)
    env.update({
        "JUPYTER_CONFIG_DIR": str(folder / "config"),
        "JUPYTER_RUNTIME_DIR": str(folder / "runtime"),
        "JUPYTER_DATA_DIR": str(folder / "data"),  # the notebook trust database goes here, not into the home folder
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    })
    env.setdefault("NANOVLLM_CACHE_DIR", str(ROOT / ".cache"))
    env.setdefault("MPLCONFIGDIR", str(ROOT / ".cache" / "matplotlib"))
    env.setdefault("IPYTHONDIR", str(ROOT / ".cache" / "ipython"))
    if break_mode == "figures":
        env["MPLBACKEND"] = "agg"  # kernels inherit it: plt.show() then displays nothing
    return env


def start_server(folder: Path, port: int, token: str, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = open(log_path, "w", encoding="utf-8")
    return subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def api(port: int, token: str, path: str, method: str = "GET"):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read()
    return json.loads(body) if body else None


def wait_for_server(server: subprocess.Popen, port: int, token: str, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {server.returncode}; see {log_path}")
        try:
            api(port, token, "/api/status")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise RuntimeError(f"JupyterLab did not answer on port {port} within {SERVER_START_TIMEOUT_S} s; see {log_path}")


def child_pids(parent: int) -> list[int]:
    """Process ids whose parent is `parent` (the kernels a server started), read from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def stop_server(server: subprocess.Popen, port: int, token: str) -> None:
    """Shut down the server's kernels, then the server; kill whatever of them is still running."""
    kernels = child_pids(server.pid)
    try:
        for kernel in api(port, token, "/api/kernels") or []:
            api(port, token, f"/api/kernels/{kernel['id']}", method="DELETE")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        pass  # the server is already gone; its kernels are killed below
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)
    for pid in kernels:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def wait_until(predicate, timeout_s: float, message: str, interval_s: float = 0.5):
    """Poll `predicate` until it returns a true value, which is returned; raise CheckFailed after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CheckFailed(message)
        time.sleep(interval_s)


KERNEL_IDLE = ".jp-Notebook-ExecutionIndicator[data-status='idle']"

PROMPTS_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt'))
    .map(prompt => prompt.textContent.trim())"""

OUTPUT_TEXT_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-OutputArea-output'))
    .map(output => output.textContent).join('\\n')"""

# PNG images in the chapter's own outputs (not inside a widget), with their decoded size.
FIGURES_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-OutputArea-output img'))
    .filter(img => !img.closest('.jupyter-widgets'))
    .filter(img => img.src.startsWith('data:image/png;base64,'))
    .map(img => ({payload: img.src.slice('data:image/png;base64,'.length),
                  width: img.naturalWidth, height: img.naturalHeight, complete: img.complete}))"""

# The step viewer is the VBox that contains a Play widget. Read its event line, slider value and drawn image.
SHOW_LAST_FIGURE_JS = """() => {
    const figures = Array.from(document.querySelectorAll('.jp-Notebook .jp-OutputArea-output img'))
        .filter(img => !img.closest('.jupyter-widgets'));
    figures[figures.length - 1].scrollIntoView({block: 'center'});
}"""

VIEWER_JS = """() => {
    const play = document.querySelector('.jp-Notebook .widget-play');
    const box = play && play.closest('.widget-vbox');
    if (!box) return null;
    const label = box.querySelector(':scope > .widget-label');
    const readout = box.querySelector('.widget-readout');
    const img = box.querySelector('.jupyter-widgets-output-area img, .widget-output img');
    return {label: label ? label.textContent : null, readout: readout ? readout.textContent.trim() : null,
            image: img ? img.src : null, imageWidth: img ? img.naturalWidth : 0};
}"""


def menu(page, menu_name: str, item: str) -> None:
    """Click an entry of JupyterLab's menu bar, as a learner does."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{menu_name}$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$")).click()


CHECKS = ["every code cell ran", "outputs", "figures", "widget"]


def run_browser(url: str, port: int, profile: Path, shots: Path, report: list[str]) -> None:
    """Drive Chromium through the chapter, appending one line to `report` per check of CHECKS that passed.

    Raises CheckFailed at the first check that fails.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            def only_loopback(route):
                if urlsplit(route.request.url).netloc == f"127.0.0.1:{port}":
                    route.continue_()
                else:
                    route.abort()  # badges and anything else on the web: this test stays on the machine

            context.route("**/*", only_loopback)
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.goto(url)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)

            # The chapter names no kernel, so JupyterLab shows a kernel dialog, as for a learner: accept its default.
            def kernel_ready():
                accept = page.locator(".jp-Dialog .jp-mod-accept")
                if accept.count():
                    accept.first.click()
                    return False
                name = page.locator(".jp-Toolbar-kernelName").first.text_content() or ""
                return "Python" in name and page.locator(KERNEL_IDLE).count() > 0

            wait_until(kernel_ready, 60, "the kernel did not start within 60 s")

            # Clear the stored outputs first, so every output checked below comes from this run.
            menu(page, "Edit", "Clear Outputs of All Cells")
            wait_until(lambda: all(p in ("[ ]:", "[]:") for p in page.evaluate(PROMPTS_JS))
                       and not page.evaluate(OUTPUT_TEXT_JS).strip(), 15, "clearing the stored outputs failed")
            menu(page, "Run", "Run All Cells")
            run_started = time.monotonic()

            def all_ran():
                prompts = page.evaluate(PROMPTS_JS)
                done = prompts and all(re.fullmatch(r"\[\d+\]:", prompt) for prompt in prompts)
                idle = page.locator(KERNEL_IDLE).count()
                return prompts if done and idle else None

            prompts = wait_until(all_ran, RUN_ALL_TIMEOUT_S,
                                 f"not every code cell ran within {RUN_ALL_TIMEOUT_S} s: {page.evaluate(PROMPTS_JS)}")
            numbers = [int(prompt[1:-2]) for prompt in prompts]
            check(numbers == list(range(1, len(numbers) + 1)), f"cells ran out of order: {numbers}")
            report.append(f"every code cell ran: {len(prompts)} cells in order, in {time.monotonic() - run_started:.0f} s")

            text = page.evaluate(OUTPUT_TEXT_JS)
            check("Traceback" not in text, "a cell raised an exception:\n" + text[max(0, text.find("Traceback") - 200):][:1500])
            for expected in EXPECTED_TEXT:
                check(expected in text, f"the outputs do not show {expected!r}")
            report.append("outputs: no traceback; " + "; ".join(repr(e) for e in EXPECTED_TEXT) + " shown")

            figures = page.evaluate(FIGURES_JS)
            check(bool(figures), "no cell output shows a PNG figure")
            sizes = []
            for figure in figures:
                data = base64.b64decode(figure["payload"])
                check(data[:8] == b"\x89PNG\r\n\x1a\n", "an image output is not a PNG")
                check(figure["complete"] and figure["width"] > 0 and figure["height"] > 0,
                      f"a PNG figure did not render ({figure['width']}x{figure['height']} px)")
                sizes.append(f"{figure['width']}x{figure['height']} px, {len(data):,} bytes")
            report.append(f"figures: {len(figures)} PNG outputs rendered ({'; '.join(sizes)})")
            page.evaluate(SHOW_LAST_FIGURE_JS)
            page.wait_for_timeout(500)
            page.screenshot(path=str(shots / "04_figure.png"))

            viewer = page.evaluate(VIEWER_JS)
            check(viewer is not None, "the step viewer (a widget box with a Play button) is not rendered")
            check(viewer["image"] is not None and viewer["imageWidth"] > 0,
                  f"the step viewer shows no block-state figure: {viewer}")
            before = viewer
            handle = page.locator(".jp-Notebook .widget-hslider .noUi-handle").first
            handle.scroll_into_view_if_needed()
            box = handle.bounding_box()
            track = page.locator(".jp-Notebook .widget-hslider .noUi-target").first.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(track["x"] + track["width"] * 0.42, box["y"] + box["height"] / 2, steps=8)
            page.mouse.up()

            def responded():
                now = page.evaluate(VIEWER_JS)
                changed = now["readout"] != before["readout"] and now["label"] != before["label"]
                return now if changed and now["image"] != before["image"] and now["imageWidth"] > 0 else None

            wait_until(responded, WIDGET_RESPONSE_TIMEOUT_S,
                       "dragging the step slider did not change the event line and the drawn state: "
                       f"before {before['readout']!r} {before['label']!r}, now {page.evaluate(VIEWER_JS)}")
            # The kernel redraws once per value the drag passed and is idle for moments in between,
            # so wait until the viewer has shown the same state for 1.5 s with the kernel idle.
            readings = []

            def settled():
                readings.append(page.evaluate(VIEWER_JS) if page.locator(KERNEL_IDLE).count() else None)
                recent = readings[-4:]
                return recent[-1] if len(recent) == 4 and recent[0] is not None and recent.count(recent[0]) == 4 else None

            after = wait_until(settled, WIDGET_RESPONSE_TIMEOUT_S, "the step viewer kept changing after the drag ended")
            # The chapter's history[k] is the state after step k - 1, and its event line starts "step k - 1:".
            step = int(after["readout"])
            check(step > 0 and after["label"].startswith(f"step {step - 1}:"),
                  f"the viewer shows {after['label']!r} for slider value {step}, expected the event line of step {step - 1}")
            report.append(f"widget: slider {before['readout']} -> {after['readout']}; "
                          f"event line {before['label']!r} -> {after['label']!r}; block-state image redrawn")
            page.evaluate("() => document.querySelector('.jp-Notebook .widget-play').scrollIntoView({block: 'start'})")
            page.mouse.move(5, 5)
            page.wait_for_timeout(500)
            page.screenshot(path=str(shots / "04_widget.png"))
        except Exception:
            try:
                page.screenshot(path=str(shots / "04_failure.png"))
            except Exception:
                pass
            raise
        finally:
            context.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--break", dest="break_mode", choices=["widgets", "figures"],
                        help="break the widget front end or the inline figures, to see the check fail")
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} not found; install Debian's Chromium with `apt-get install -y chromium`.")
        return 1

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("04_*.png"):
        old.unlink()
    started = time.monotonic()
    port, token = free_port(), secrets.token_hex(24)
    log_path = ARTIFACTS / "jupyterlab.log"
    with tempfile.TemporaryDirectory(prefix="browser-test-") as temporary:
        folder = Path(temporary)
        env = prepare_workspace(folder / "lab", args.break_mode)
        server = start_server(folder / "lab", port, token, env, log_path)
        report: list[str] = []
        try:
            wait_for_server(server, port, token, log_path)
            url = f"http://127.0.0.1:{port}/lab/tree/notebooks/{CHAPTER.name}?token={token}"
            run_browser(url, port, folder / "chromium-profile", ARTIFACTS, report)
        except CheckFailed as failure:
            for line in report:
                print(f"  passed: {line}")
            failed_check = CHECKS[len(report)]
            print(f"  FAILED: {failed_check}: {failure}")
            if args.break_mode:
                print(f"  (broken on purpose with --break {args.break_mode})")
            print(f"  screenshot: {(ARTIFACTS / '04_failure.png').relative_to(ROOT)}; server log: {log_path.relative_to(ROOT)}")
            print(f"browser-test: {len(report)} passed, 1 failed")
            return 1
        finally:
            stop_server(server, port, token)
    for line in report:
        print(f"  passed: {line}")
    print(f"  screenshots: {', '.join(str(p.relative_to(ROOT)) for p in sorted(ARTIFACTS.glob('04_*.png')))}")
    print(f"  JupyterLab with headless Chromium on {CHAPTER.name}, {time.monotonic() - started:.0f} s in all")
    print(f"browser-test: {len(report)} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
