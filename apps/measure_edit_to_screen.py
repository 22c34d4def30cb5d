"""Edit-to-screen time of the app in a real headless Chromium, and the helpers the browser test uses.

    .venv/bin/python apps/measure_edit_to_screen.py                 # ft_l on the default model, 5 edits
    .venv/bin/python apps/measure_edit_to_screen.py --runs 5 --method mend --screenshots runs/app-shots

It starts `streamlit run apps/app.py` on a free port with a throwaway journal, opens the page, and
`--runs` times: types the prompt and target, clicks "Apply edit" and times the click until the line
"Now: <prompt> → top prediction ..." shows the edited model (with `--expect`, until that token is the
top prediction; by default until the line differs from the one before the click): the edit, the
before/after predictions and the page update, as a person sees them; then reverts the edit and waits
for the old line to come back. Prints every time, the medians and where the time went (the app writes
its side to $FACTEDIT_APP_TIMINGS): from the click until the page's run starts the edit, the session's
edit call (of it the Editor's own edit_ms: compute, drift guard, scoring), and from the end of that call
until the line is on the screen. Needs Debian's chromium (/usr/bin/chromium).
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

from editapp.tokens import readable  # apps/ is this script's folder, and on the browser test's path

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
        "--client.toolbarMode", "minimal",
        # No file watcher: the repository is on the server's PYTHONPATH, so Streamlit would watch factedit's
        # files too, and a change to one while the app runs (other work in the same checkout) evicts that
        # module at the next rerun: its re-imported classes are no longer those of the cached session's
        # objects ("PreserveConfig is not a subclass of PreserveConfig").
        "--server.fileWatcherType", "none",
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


def now_line(page, prompt: str, answer: str | None = None):
    """The locator of the line that shows `answer` as the prompt's current top prediction (any answer
    when None)."""
    shown = f"Now: {prompt} → top prediction " + (readable(answer) + " (p =" if answer is not None else "")
    return page.get_by_text(re.compile("^" + re.escape(shown)))


def wait_for_change(page, prompt: str, old_text: str, timeout_s: float) -> str:
    """Wait until the prompt's "Now:" line reads other than `old_text`; returns the new text."""
    line = now_line(page, prompt)
    page.wait_for_function(
        "([pattern, old]) => [...document.querySelectorAll('p')].some("
        "p => p.innerText.startsWith(pattern) && p.innerText !== old)",
        arg=[f"Now: {prompt} → top prediction ", old_text], timeout=timeout_s * 1000)
    return line.first.inner_text()


def open_app(page, url: str, timeout_s: float) -> None:
    page.goto(url, timeout=timeout_s * 1000)
    page.get_by_role("button", name="Preview edit").wait_for(timeout=timeout_s * 1000)
    page.get_by_text(re.compile(r"^Now: ")).wait_for(timeout=timeout_s * 1000)


def wait_idle(page, timeout_s: float) -> None:
    """Wait until no script run is in progress: the app root says so and no status widget is shown."""
    page.wait_for_function(
        "() => document.querySelector('[data-testid=\"stApp\"]')?.getAttribute('data-test-script-state')"
        " === 'notRunning' && !document.querySelector('[data-testid=\"stStatusWidget\"]')",
        timeout=timeout_s * 1000)


def apply_edit(
    page, method: str, prompt: str, target: str, expect: str | None, timeout_s: float,
) -> tuple[float, float]:
    """Fill the form, click "Apply without preview"; (wall-clock time of the click, seconds from the click until the new
    prediction shows): `expect` as the top prediction, or (None) any change of the "Now:" line."""
    fill_fact(page, method, prompt, target, timeout_s)
    old_text = now_line(page, prompt).first.inner_text() if expect is None else ""
    button = page.get_by_role("button", name="Apply without preview")
    clicked, start = time.time(), time.perf_counter()
    button.click()
    if expect is None:
        wait_for_change(page, prompt, old_text, timeout_s)
    else:
        now_line(page, prompt, expect).wait_for(timeout=timeout_s * 1000)
    seconds = time.perf_counter() - start
    applied = page.get_by_text(re.compile(rf"^Edit \w+ applied with {re.escape(method)}"))
    applied.wait_for(timeout=timeout_s * 1000)  # not timed: that the change shown is this edit's
    return clicked, seconds


def fill_fact(page, method: str, prompt: str, target: str, timeout_s: float) -> None:
    """Choose the method and type the fact into the edit form (the first "Prompt"/"New target" boxes)."""
    wait_idle(page, timeout_s)
    _choose_method(page, method)
    for label, value in (("Prompt", prompt), ("New target", target)):
        page.get_by_role("textbox", name=label, exact=True).first.fill(value)


def preview_edit(page, method: str, prompt: str, target: str, timeout_s: float) -> float:
    """Fill the form, click "Preview edit"; seconds until the preview's verdict and its confirm button show."""
    fill_fact(page, method, prompt, target, timeout_s)
    start = time.perf_counter()
    page.get_by_role("button", name="Preview edit").click()
    page.get_by_role("button", name="Apply this edit").wait_for(timeout=timeout_s * 1000)
    page.get_by_text(re.compile(r"^(With this edit|A weak flip|The edit would not take)")).first.wait_for(
        timeout=timeout_s * 1000)
    return time.perf_counter() - start


def confirm_preview(page, prompt: str, expect: str, timeout_s: float) -> float:
    """Click "Apply this edit"; seconds until the prompt's top prediction is `expect`."""
    wait_idle(page, timeout_s)
    start = time.perf_counter()
    page.get_by_role("button", name="Apply this edit").click()
    now_line(page, prompt, expect).wait_for(timeout=timeout_s * 1000)
    return time.perf_counter() - start


# True once the column under the header `head` shows reply text (not a stale element of an earlier run).
_REPLY_SHOWN = """([head]) => [...document.querySelectorAll('[data-testid="stColumn"]')].some(col => {
  const parts = [...col.querySelectorAll('[data-testid="stMarkdownContainer"]')]
    .filter(p => !p.closest('[data-stale="true"]'));
  return parts.length > 1 && parts[0].innerText.startsWith(head)
    && parts.slice(1).some(p => p.innerText.trim().length > 0);
})"""


def ask_chat(page, question: str, head: str, timeout_s: float) -> tuple[float, float]:
    """Ask `question` in the chat view; (seconds until the first words of the reply under `head` show,
    seconds until the page is idle again: both replies done)."""
    wait_idle(page, timeout_s)
    page.get_by_text("Chat", exact=True).first.click()  # the view's radio (the default view already)
    page.get_by_role("textbox", name="Your question").fill(question)
    start = time.perf_counter()
    page.get_by_role("button", name="Ask", exact=True).click()
    page.wait_for_function(_REPLY_SHOWN, arg=[head], timeout=timeout_s * 1000)
    first = time.perf_counter() - start
    wait_idle(page, timeout_s)
    return first, time.perf_counter() - start


def revert_selected(page, prompt: str, expect: str, timeout_s: float) -> float:
    """Click "Revert selected" (the newest edit is selected after an edit); seconds until the "Now:" line is
    `expect` (its whole text, or the top prediction's token when it starts with a quote-less token)."""
    button = page.get_by_role("button", name="Revert selected")
    button.wait_for(timeout=timeout_s * 1000)
    wait_idle(page, timeout_s)
    start = time.perf_counter()
    button.click()
    if expect.startswith("Now: "):
        page.get_by_text(expect, exact=True).wait_for(timeout=timeout_s * 1000)
    else:
        now_line(page, prompt, expect).wait_for(timeout=timeout_s * 1000)
    return time.perf_counter() - start


def show_diff(page, timeout_s: float) -> None:
    """Click "Diff selected" and wait until the diff is on the page."""
    wait_idle(page, timeout_s)
    page.get_by_role("button", name="Diff selected").click()
    page.get_by_text("Prediction changes").wait_for(timeout=timeout_s * 1000)
    wait_idle(page, timeout_s)


def _choose_method(page, method: str) -> None:
    box = page.get_by_role("combobox", name="Method", exact=True)
    if (box.input_value() if box.count() else "") == method:
        return
    box.click()
    box.fill(method)  # filters the options (the list may open filtered by the current value)
    page.get_by_role("option", name=method, exact=True).click()
    page.get_by_text(f"Settings of {method}", exact=True).wait_for()  # the page reran for the chosen method
    wait_idle(page, 60)


def _preview_flow(page, args: argparse.Namespace, original: str, shots: Path) -> dict:
    """Per run: preview to screen, apply after confirm to screen, the chat reply's first words and its end."""
    runs = []
    for run in range(args.runs):
        preview = preview_edit(page, args.method, args.prompt, args.target, args.timeout)
        if run == 0:
            page.screenshot(path=str(shots / "1-preview.png"), full_page=True)
        confirm = confirm_preview(page, args.prompt, args.expect or args.target, args.timeout)
        first, done = ask_chat(page, f"What is the capital of France? ({run + 1})", "With edit", args.timeout)
        if run == 0:
            page.screenshot(path=str(shots / "2-chat.png"), full_page=True)
        revert = revert_selected(page, args.prompt, original, args.timeout)
        runs.append({"preview_to_screen_s": round(preview, 3), "confirm_to_screen_s": round(confirm, 3),
                     "chat_first_words_s": round(first, 3), "chat_both_replies_s": round(done, 3),
                     "revert_to_screen_s": round(revert, 3)})
        print(f"run {run + 1}: {runs[-1]}", file=sys.stderr, flush=True)
    return {"method": args.method, "runs": runs,
            "median": {k: statistics.median(r[k] for r in runs) for k in runs[0]} if runs else {},
            "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2), "screenshots": str(shots)}


def _split(clicks: list[float], screens: list[float], timings_file: Path) -> list[dict]:
    """Per run, where the edit-to-screen time went (seconds), from the app's timings and the click times:
    the click until the page's run starts the edit (browser, websocket, the page down to the form), the
    session's edit call (of it the Editor's compute, drift guard and scoring), and from the end of the
    call until the new line is on the screen (the page from the status line to the "Now:" line, the
    websocket and the browser). `page_run` is the whole run that made the edit and drew the page."""
    lines = [json.loads(line) for line in timings_file.read_text().splitlines()] if timings_file.exists() else []
    edits = [t for t in lines if t.get("action") == "edit"]
    out = []
    for clicked, screen, app in zip(clicks, screens, edits, strict=False):
        editor = app.get("editor") or {}
        out.append({
            "click_to_edit_start": round(app["action_start"] - clicked, 3),
            "session_edit_call": round(app["session_s"], 3),
            "editor_edit_ms": editor.get("edit_ms"), "compute_ms": editor.get("compute_ms"),
            "guard_ms": editor.get("guard_ms"), "score_ms": editor.get("score_ms"),
            "edit_end_to_screen": round(clicked + screen - app["action_end"], 3),
            "page_run": round(app["page_end"] - app["page_start"], 3),
        })
    return out


def _editor_times(journal: Path) -> list[float]:
    """`edit_ms` of every edit in the journal: the Editor's own time, without the app around it."""
    from factedit.editing.journal import Journal

    with Journal(journal) as opened:
        return [round(r.timings.get("edit_ms", float("nan")), 1) for r in opened.records(deltas=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--flow", choices=("apply", "preview"), default="apply",
                        help="apply: \"Apply without preview\"; preview: \"Preview edit\", then \"Apply this edit\", "
                             "then a chat question (first words of the reply), then revert")
    parser.add_argument("--method", default="ft_l")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--target", default="Rome")
    parser.add_argument("--expect", default=None,
                        help="the token that should become top (default: any change of the prompt's top prediction)")
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
    expect = args.expect
    work = Path(tempfile.mkdtemp(prefix="factedit-measure-"))
    shots = Path(args.screenshots) if args.screenshots else work
    shots.mkdir(parents=True, exist_ok=True)
    env = {"FACTEDIT_APP_JOURNAL": str(work / "journal.sqlite"), "FACTEDIT_APP_TIMINGS": str(work / "timings.jsonl")}
    if args.model:
        env["FACTEDIT_APP_MODEL"] = args.model
    if args.threads is not None:
        env["FACTEDIT_APP_THREADS"] = str(args.threads)
    times, reverts, clicks = [], [], []
    with app_server(env, work / "server.log", timeout=args.timeout) as url, browser_page() as page:
        open_app(page, url, args.timeout)
        now_line(page, args.prompt, args.old).wait_for(timeout=args.timeout * 1000)
        wait_idle(page, args.timeout)
        original = now_line(page, args.prompt).first.inner_text()
        page.screenshot(path=str(shots / "0-start.png"), full_page=True)
        if args.flow == "preview":
            print(json.dumps(_preview_flow(page, args, original, shots), indent=1))
            return 0
        for run in range(args.runs):
            clicked, seconds = apply_edit(page, args.method, args.prompt, args.target, expect, args.timeout)
            clicks.append(clicked)
            times.append(seconds)
            if run == 0:
                wait_idle(page, args.timeout)
                page.screenshot(path=str(shots / "1-edited.png"), full_page=True)
                show_diff(page, args.timeout)
                page.screenshot(path=str(shots / "2-diff.png"), full_page=True)
            reverts.append(revert_selected(page, args.prompt, original, args.timeout))
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
        "split_s": (split := _split(clicks, times, work / "timings.jsonl")),
        "median_split_s": {k: statistics.median(s[k] for s in split) for k in (split[0] if split else {})
                           if all(s[k] is not None for s in split)},
        "app_threads": env.get("FACTEDIT_APP_THREADS", "factedit/conf/app.yaml"), "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2), "screenshots": str(shots),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
