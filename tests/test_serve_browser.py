"""The browser view in a real headless Chromium (Debian's, driven by Playwright): type a short
conversation, see one labelled row per utterance and the chart's points, reopen it; screenshot saved."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")
from serve_support import fake_embed, open_session_page, thread_server  # noqa: E402

from affectkit.models import build_model  # noqa: E402
from affectkit.serve.app import ServeSettings, create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions",
        "--disable-background-networking", "--disable-component-update", "--no-first-run",
        "--disable-default-apps", "--disable-sync", "--metrics-recording-only", "--mute-audio"]
INFO = {"dims": {"text": 8}, "n_classes": 4, "label_names": ["hap", "sad", "neu", "ang"], "n_speakers": 2,
        "speakers": ["F", "M"]}
CONVERSATION = [("Ana", "Good morning!"), ("Ben", "Is it? I missed the bus again."), ("Ana", "Oh no, I'm sorry."),
                ("Ben", "Whatever. It always happens."), ("Ana", "Let me give you a lift tomorrow.")]


def embed(sentences: list[str]) -> np.ndarray:
    return fake_embed(sentences, 8)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_live_view_in_chromium(tmp_path):
    torch.manual_seed(0)
    model = build_model("corect", {"hidden": 8, "text_ff": 16, "text_layers": 1, "text_heads": 2, "graph_heads": 2,
                                   "wp": 3, "wf": 0, "causal": True, "modalities": ["text"]}, INFO).eval()
    app = create_app((model, INFO), tmp_path / "s.db", ServeSettings(), embed=embed)
    with thread_server(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            errors = open_session_page(page, url)
            for k, (speaker, text) in enumerate(CONVERSATION):
                page.fill("#speaker", speaker)
                page.fill("#text", text)
                page.press("#text", "Enter")
                page.wait_for_selector(f'#rows tr[data-position="{k}"]')
            rows = page.locator("#rows tr")
            assert rows.count() == len(CONVERSATION)
            for k, (speaker, text) in enumerate(CONVERSATION):
                cells = rows.nth(k).locator("td").all_inner_texts()
                assert cells[:3] == [str(k), speaker, text]
                assert cells[3] in INFO["label_names"] and 0 < float(cells[4]) <= 1 and float(cells[5]) > 0
            assert page.locator("svg.chart").count() == 2  # one timeline per speaker
            assert page.locator("svg.chart circle.pt").count() == len(CONVERSATION) * 4  # a point per class
            assert page.locator('svg.chart[data-speaker="Ana"] circle.pt').count() == 3 * 4
            assert "last answer" in page.inner_text("#latency")
            page.screenshot(path=str(tmp_path / "live_view.png"), full_page=True)

            token = page.input_value("#token")
            assert len(token) > 20 and token not in page.url and "token" not in page.url  # never in a URL
            page.reload()  # the id rides in the URL fragment, the token in the tab's sessionStorage
            page.wait_for_selector('body[data-state="ready"]')
            assert page.locator("#rows tr").count() == len(CONVERSATION)
            assert page.locator("svg.chart circle.pt").count() == len(CONVERSATION) * 4
            assert not errors, errors
        finally:
            browser.close()
    assert (tmp_path / "live_view.png").stat().st_size > 10_000
