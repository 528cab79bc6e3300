"""The Space in a real browser: headless Chromium driven by selenium.

Skipped when Debian's chromium and chromium-driver are missing (``apt-get install -y chromium
chromium-driver``; scripts/setup.sh installs them when run as root, so CI runs these tests).
Screenshots go to the test's tmp folder; their paths are printed (pytest -s shows them).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qkmonitor import audit

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs headless Chromium: apt-get install -y chromium chromium-driver",
)
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="needs selenium (pip install selenium)"
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as until  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT = 60  # seconds; an audit of the tiny models takes well under one


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--window-size=1400,1300",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):  # fmt: skip
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(service=service, options=options)
    yield driver
    driver.quit()


def _open(browser, url: str):
    browser.get(url)
    return WebDriverWait(browser, WAIT).until(
        until.element_to_be_clickable((By.CSS_SELECTOR, "#model-id textarea"))
    )


def _type(box, text: str) -> None:
    box.clear()
    box.send_keys(text)


def _plot_data(browser, elem_id: str) -> list[dict]:
    """The plotly traces drawn in a gr.Plot, read from the page."""
    return browser.execute_script(
        "const plot = document.querySelector(arguments[0] + ' .js-plotly-plot');"
        "return plot.data.map(t => ({type: t.type, z: t.z, x: t.x, y: t.y}));",
        f"#{elem_id}",
    )


def _wait_for_plot(browser, elem_id: str, kind: str) -> None:
    """Until the gr.Plot holds a drawn plotly trace of this kind (heatmap: its image layer)."""
    selector = f"#{elem_id} .js-plotly-plot " + (".hm image" if kind == "heatmap" else ".point")
    WebDriverWait(browser, WAIT).until(
        until.presence_of_element_located((By.CSS_SELECTOR, selector))
    )


def _screenshot(browser, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    browser.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def test_audit_click_draws_the_heatmaps_with_the_audits_numbers(browser, url, models, tmp_path):
    box = _open(browser, url)
    _type(box, "qk/tiny-bert")
    browser.find_element(By.ID, "audit-button").click()
    for statistic in ("eig_var", "eig_mean", "spectral_norm"):
        _wait_for_plot(browser, f"heatmap-{statistic}", "heatmap")
    _wait_for_plot(browser, "eigenvalues", "scatter")
    WebDriverWait(browser, WAIT).until(
        until.text_to_be_present_in_element((By.ID, "headline"), "qk/tiny-bert")
    )
    expected = audit(models.bert)
    (trace,) = _plot_data(browser, "heatmap-eig_var")
    assert trace["type"] == "heatmap" and trace["z"] == expected.grid("eig_var")
    assert "Most concentrated head" in browser.find_element(By.ID, "headline").text
    assert _screenshot(browser, tmp_path, "space-audit").stat().st_size > 10_000


def test_bad_input_shows_one_clear_line_and_the_page_keeps_working(browser, url, tmp_path):
    box = _open(browser, url)
    _type(box, "../etc/<b>passwd</b>")
    browser.find_element(By.ID, "audit-button").click()
    toast = WebDriverWait(browser, WAIT).until(
        until.visibility_of_element_located((By.CSS_SELECTOR, "[data-testid='toast-text']"))
    )
    assert "'../etc/<b>passwd</b>' looks like a local path" in toast.text  # shown, not rendered
    _screenshot(browser, tmp_path, "space-bad-input")
    _type(box, "qk/tiny-llama")
    browser.find_element(By.ID, "audit-button").click()
    WebDriverWait(browser, WAIT).until(
        until.text_to_be_present_in_element((By.ID, "headline"), "qk/tiny-llama")
    )


def test_compare_and_attention_tabs_draw_their_plots(browser, url, models, tmp_path):
    box = _open(browser, url)
    _type(box, "qk/tiny-llama")
    browser.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Compare')]").click()
    _type(browser.find_element(By.CSS_SELECTOR, "#other-revision textarea"), "finetuned")
    browser.find_element(By.ID, "compare-button").click()
    _wait_for_plot(browser, "difference", "heatmap")
    (trace,) = _plot_data(browser, "difference")
    base, tuned = audit(models.llama).grid("eig_var"), audit(models.llama_tuned).grid("eig_var")
    assert trace["z"][0] == [0.0] * 4  # layer 0 is unchanged
    assert trace["z"][1] == pytest.approx([b - a for a, b in zip(base[1], tuned[1], strict=True)])
    _screenshot(browser, tmp_path, "space-compare")
    tab = "//button[@role='tab'][contains(., 'Attention on your text')]"
    browser.find_element(By.XPATH, tab).click()
    browser.find_element(By.ID, "text-button").click()
    _wait_for_plot(browser, "attention-entropy", "heatmap")
    _wait_for_plot(browser, "attention-map", "heatmap")
    (attention,) = _plot_data(browser, "attention-map")
    assert attention["x"][0] == "0: [CLS]" and len(attention["z"]) == len(attention["x"])
    _screenshot(browser, tmp_path, "space-attention")
