"""The browser view hears a microphone: headless Chromium (Debian's, through Playwright) with a SYNTHETIC
spoken WAV (espeak-ng) as its fake microphone; the page captures it with getUserMedia, downsamples it in
its AudioWorklet to 16 kHz PCM and streams it; the rows with the transcribed words and their labels
appear on the timeline (screenshot saved)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("silero_vad")
pytest.importorskip("faster_whisper")
pytest.importorskip("opensmile")
sync_api = pytest.importorskip("playwright.sync_api")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed (.ci/run installs it)", allow_module_level=True)
from audio_support import layout  # noqa: E402
from serve_support import fake_embed, open_session_page, thread_server  # noqa: E402
from test_serve_browser import ARGS, CHROMIUM, INFO  # noqa: E402

from affectkit.audio.frontend import word_errors  # noqa: E402
from affectkit.audio.pcm import resample, write_wav  # noqa: E402
from affectkit.audio.synthetic import speak  # noqa: E402
from affectkit.models import build_model  # noqa: E402
from affectkit.serve.app import ServeSettings, create_app  # noqa: E402

SAID = ["I am so happy to see you today.", "Please send me the report."]


def embed(sentences: list[str]) -> np.ndarray:
    return fake_embed(sentences, 8)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_microphone_rows_in_chromium(tmp_path):
    track, _ = layout([(1.0, speak(SAID[0])), (1.5, speak(SAID[1], "en-gb")), (6.0, None)])
    wav = tmp_path / "mic.wav"
    write_wav(wav, resample(track, 16000, 48000), 48000)  # what a sound card gives; the page downsamples
    torch.manual_seed(0)
    model = build_model("corect", {"hidden": 8, "text_ff": 16, "text_layers": 1, "text_heads": 2, "graph_heads": 2,
                                   "wp": 3, "wf": 0, "causal": True, "modalities": ["text"]}, INFO).eval()
    app = create_app((model, INFO), tmp_path / "s.db", ServeSettings(), embed=embed)
    args = ARGS + ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                   f"--use-file-for-fake-audio-capture={wav}%noloop", "--autoplay-policy=no-user-gesture-required"]
    with thread_server(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 760})
            context.grant_permissions(["microphone"], origin=url)
            page = context.new_page()
            errors = open_session_page(page, url)
            page.fill("#speaker", "Ana")
            page.click("#mic")
            page.wait_for_selector('#mics .mic[data-speaker="Ana"]')
            page.wait_for_selector('#rows tr[data-source="audio"][data-position="1"]', timeout=90_000)
            rows = page.locator('#rows tr[data-source="audio"]')
            assert rows.count() == 2
            for k, said in enumerate(SAID):
                cells = rows.nth(k).locator("td").all_inner_texts()
                assert cells[0] == str(k) and cells[1] == "Ana"
                assert word_errors(said, cells[2])[0] <= 2, cells[2]
                assert cells[3] in INFO["label_names"] and 0 < float(cells[4]) <= 1
            assert page.locator('svg.chart[data-speaker="Ana"] circle.pt').count() == 2 * 4
            page.screenshot(path=str(tmp_path / "microphone.png"), full_page=True)
            page.click("#mic")  # stops the microphone
            page.wait_for_function("document.querySelectorAll('#mics .mic').length === 0")
            assert not errors, errors
        finally:
            browser.close()
    assert (tmp_path / "microphone.png").stat().st_size > 10_000
