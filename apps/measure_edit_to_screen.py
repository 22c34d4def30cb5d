"""Edit-to-screen time of the app in a real headless Chromium, and the helpers the browser test uses.

    .venv/bin/python apps/measure_edit_to_screen.py                 # ft_l on the default model, 5 edits
    .venv/bin/python apps/measure_edit_to_screen.py --runs 5 --method ft_l --screenshots runs/app-shots

It starts `streamlit run apps/app.py` on a free port with a throwaway journal, opens the page, and
`--runs` times: types the prompt and target, clicks "Apply edit" and times the click until the line
"Now: <prompt> → top prediction '<new>'" is on the screen (the edit, the before/after predictions and
the page update, as a person sees them); then reverts the edit and waits for the old answer to come
back. Prints every time and the median as JSON. Needs Debian's chromium (/usr/bin/chromium).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
APP = REPO_ROOT / "apps" / "app.py"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def app_server(env: dict[str, str], log_path: Path, timeout: float = 120.0) -> Iterator[str]:
    """Run the app on a free port until the block ends; yields its URL once /_stcore/health answers."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
        "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
    ]
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "PYTHONPATH": python_path,
                **env}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the app exited with {proc.returncode}; see {log_path}")
                with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the app did not answer within {timeout:.0f} s; see {log_path}")
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 2600):
    """A page of a headless Debian Chromium driven by playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            yield context.new_page()
        finally:
            browser.close()


def now_line(page, prompt: str, answer: str):
    """The locator of the line that shows `answer` as the prompt's current top prediction."""
    return page.get_by_text(re.compile(re.escape(f"Now: {prompt} → top prediction {answer!r}")))


def open_app(page, url: str, timeout_s: float) -> None:
    page.goto(url, timeout=timeout_s * 1000)
    page.get_by_role("button", name="Apply edit").wait_for(timeout=timeout_s * 1000)
    page.get_by_text(re.compile(r"^Now: ")).wait_for(timeout=timeout_s * 1000)


def wait_idle(page, timeout_s: float) -> None:
    """Wait until no script run is in progress (Streamlit shows its status widget while running)."""
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
                           timeout=timeout_s * 1000)


def apply_edit(page, method: str, prompt: str, target: str, expect: str, timeout_s: float) -> float:
    """Fill the form, click "Apply edit"; seconds from the click until the new prediction shows."""
    wait_idle(page, timeout_s)
    _choose_method(page, method)
    for label, value in (("Prompt", prompt), ("New target", target)):
        box = page.get_by_role("textbox", name=label, exact=True)
        box.fill(value)
    button = page.get_by_role("button", name="Apply edit")
    start = time.perf_counter()
    button.click()
    now_line(page, prompt, expect).wait_for(timeout=timeout_s * 1000)
    return time.perf_counter() - start


def revert_selected(page, prompt: str, expect: str, timeout_s: float) -> float:
    """Click "Revert selected" (the newest edit is selected after an edit); seconds until `expect` shows."""
    button = page.get_by_role("button", name="Revert selected")
    button.wait_for(timeout=timeout_s * 1000)
    wait_idle(page, timeout_s)
    start = time.perf_counter()
    button.click()
    now_line(page, prompt, expect).wait_for(timeout=timeout_s * 1000)
    return time.perf_counter() - start


def show_diff(page, timeout_s: float) -> None:
    """Click "Diff selected" and wait until the diff is on the page."""
    wait_idle(page, timeout_s)
    page.get_by_role("button", name="Diff selected").click()
    page.get_by_text("Prediction changes").wait_for(timeout=timeout_s * 1000)
    wait_idle(page, timeout_s)


def _choose_method(page, method: str) -> None:
    box = page.get_by_role("combobox", name=re.compile("Method"))
    if method in (box.input_value() if box.count() else ""):
        return
    box.click()
    page.get_by_role("option", name=method, exact=True).click()


def _editor_times(journal: Path) -> list[float]:
    """`edit_ms` of every edit in the journal: the Editor's own time, without the app around it."""
    from factedit.editing.journal import Journal

    with Journal(journal) as opened:
        return [round(r.timings.get("edit_ms", float("nan")), 1) for r in opened.records(deltas=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--method", default="ft_l")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--target", default="Rome")
    parser.add_argument("--expect", default=None, help="the token that should become top (default: ' '+target)")
    parser.add_argument("--old", default=" Paris", help="the top token before the edit")
    parser.add_argument("--model", default=None, help="FACTEDIT_APP_MODEL for the app (default: the default model)")
    parser.add_argument("--screenshots", default=None, help="folder for screenshots (default: a temp folder)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for any one step")
    parser.add_argument("--threads", type=int, default=None,
                        help="FACTEDIT_APP_THREADS for the app (default: factedit/conf/app.yaml; 0: torch's default)")
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver", file=sys.stderr)
        return 2
    expect = args.expect or " " + args.target
    work = Path(tempfile.mkdtemp(prefix="factedit-measure-"))
    shots = Path(args.screenshots) if args.screenshots else work
    shots.mkdir(parents=True, exist_ok=True)
    env = {"FACTEDIT_APP_JOURNAL": str(work / "journal.sqlite")}
    if args.model:
        env["FACTEDIT_APP_MODEL"] = args.model
    if args.threads is not None:
        env["FACTEDIT_APP_THREADS"] = str(args.threads)
    times, reverts = [], []
    with app_server(env, work / "server.log", timeout=args.timeout) as url, browser_page() as page:
        open_app(page, url, args.timeout)
        now_line(page, args.prompt, args.old).wait_for(timeout=args.timeout * 1000)
        wait_idle(page, args.timeout)
        page.screenshot(path=str(shots / "0-start.png"), full_page=True)
        for run in range(args.runs):
            times.append(apply_edit(page, args.method, args.prompt, args.target, expect, args.timeout))
            if run == 0:
                wait_idle(page, args.timeout)
                page.screenshot(path=str(shots / "1-edited.png"), full_page=True)
                show_diff(page, args.timeout)
                page.screenshot(path=str(shots / "2-diff.png"), full_page=True)
            reverts.append(revert_selected(page, args.prompt, args.old, args.timeout))
            if run == 0:
                wait_idle(page, args.timeout)
                page.screenshot(path=str(shots / "3-reverted.png"), full_page=True)
                page.get_by_role("button", name="Hide diff").click()
            print(f"run {run + 1}: edit-to-screen {times[-1]:.2f} s, revert-to-screen {reverts[-1]:.2f} s",
                  file=sys.stderr, flush=True)
    edit_ms = _editor_times(Path(env["FACTEDIT_APP_JOURNAL"]))
    print(json.dumps({
        "method": args.method, "prompt": args.prompt, "target": args.target, "runs": args.runs,
        "edit_to_screen_s": [round(t, 3) for t in times], "median_edit_to_screen_s": round(statistics.median(times), 3),
        "revert_to_screen_s": [round(t, 3) for t in reverts],
        "median_revert_to_screen_s": round(statistics.median(reverts), 3),
        "editor_edit_ms": edit_ms, "median_editor_edit_ms": round(statistics.median(edit_ms), 1) if edit_ms else None,
        "app_threads": env.get("FACTEDIT_APP_THREADS", "factedit/conf/app.yaml"), "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2), "screenshots": str(shots),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
