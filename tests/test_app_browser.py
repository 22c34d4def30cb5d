"""End to end in a real headless Chromium: start the app server on a tiny model, apply an edit through
the page, see the new prediction, revert it, see the old one again; screenshots are saved.

Needs Debian's chromium (`apt-get install -y chromium chromium-driver`; .ci/run installs it) and the
playwright package; skipped with the reason otherwise. Screenshots go to $FACTEDIT_SCREENSHOT_DIR if
set, else to the test's tmp_path (printed).
"""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps"))

import measure_edit_to_screen as ui  # noqa: E402 - found through the path set above

pytestmark = pytest.mark.browser

PROMPT, TARGET = "The capital of France is", "Rome"
CONFIG = """
default_method: ft_l
continuation_tokens: 3
method_overrides:
  ft_l: {layers: [-1], lr: 0.1, norm_constraint: 0.1, max_steps: 10}
"""
TIMEOUT_S = 180.0  # per step: two shared CPU cores


def test_edit_and_revert_in_a_real_browser(tmp_path):
    if not ui.CHROMIUM.exists():
        reason = f"{ui.CHROMIUM} is missing: apt-get install -y chromium chromium-driver (.ci/run does)"
        if os.environ.get("CI") == "true":  # CI must run this test, not skip it silently
            pytest.fail(reason)
        pytest.skip(reason)
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "app.yaml").write_text(CONFIG)
    shots = Path(os.environ.get("FACTEDIT_SCREENSHOT_DIR") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    env = {
        "FACTEDIT_APP_MODEL": str(tmp_path / "model"),
        "FACTEDIT_APP_JOURNAL": str(tmp_path / "journal.sqlite"),
        "FACTEDIT_APP_CONFIG": str(tmp_path / "app.yaml"),
    }
    with ui.app_server(env, tmp_path / "server.log", timeout=TIMEOUT_S) as url, ui.browser_page() as page:
        other_tab = page.context.new_page()
        ui.open_app(other_tab, url, TIMEOUT_S)
        ui.open_app(page, url, TIMEOUT_S)
        ui.wait_idle(page, TIMEOUT_S)
        line = page.get_by_text(re.compile(r"^Now: ")).inner_text()
        old = ast.literal_eval(re.search(r"top prediction ('.*?') \(p =", line).group(1))
        assert old != " Rome"

        ui.apply_edit(page, "ft_l", PROMPT, TARGET, " Rome", TIMEOUT_S)
        ui.wait_idle(page, TIMEOUT_S)
        assert page.get_by_text(re.compile(r"^After: top prediction ' Rome'")).count() == 1
        page.screenshot(path=str(shots / "app-edited.png"), full_page=True)
        ui.now_line(other_tab, PROMPT, " Rome").wait_for(timeout=TIMEOUT_S * 1000)  # the other tab follows

        ui.revert_selected(page, PROMPT, old, TIMEOUT_S)
        ui.wait_idle(page, TIMEOUT_S)
        assert page.get_by_text(re.compile(r"\(ft_l, reverted\)")).count() == 1
        assert page.get_by_text(re.compile("failed")).count() == 0
        page.screenshot(path=str(shots / "app-reverted.png"), full_page=True)
    print(f"screenshots: {shots}")
