"""The Space in a real browser: headless Chromium driven by selenium.

Skipped when Debian's chromium and chromium-driver are missing (``apt-get install -y chromium
chromium-driver``; scripts/setup.sh installs them when run as root, so CI runs these tests).
Screenshots go to the test's tmp folder; their paths are printed (pytest -s shows them).
"""

from __future__ import annotations

import math
import re
import time
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
        "return plot.data.map(t => ({type: t.type, z: t.z, x: t.x, y: t.y,"
        " customdata: t.customdata, bar: t.colorbar && t.colorbar.title && t.colorbar.title.text,"
        " title: plot.layout.title && plot.layout.title.text, colorscale: t.colorscale,"
        " zmid: t.zmid, zmin: t.zmin, zmax: t.zmax,"
        " ticktext: t.colorbar && t.colorbar.ticktext}));",
        f"#{elem_id}",
    )


def _log10(grid: list[list[float]]) -> list[list[float | None]]:
    return [[math.log10(v) if v > 0 else None for v in row] for row in grid]


def _wait_for_trace(browser, elem_id: str, check) -> list[dict]:
    """Until the plot's traces pass check (a redraw replaces them), then the traces."""
    found: list = []

    def drawn(_driver) -> bool:
        try:
            found[:] = _plot_data(browser, elem_id)
        except Exception:  # mid-redraw: no plot element for a moment
            return False
        return bool(found) and check(found)

    WebDriverWait(browser, WAIT).until(drawn)
    return found


def _wait_for_plot(browser, elem_id: str, kind: str) -> None:
    """Until the gr.Plot holds a drawn plotly trace of this kind (heatmap: its image layer)."""
    selector = f"#{elem_id} .js-plotly-plot " + (".hm image" if kind == "heatmap" else ".point")
    WebDriverWait(browser, WAIT).until(
        until.presence_of_element_located((By.CSS_SELECTOR, selector))
    )


def _title_overlaps_a_tick(browser, elem_id: str) -> bool:
    """Whether the drawn colour bar's title box meets any of its tick labels' boxes."""
    return browser.execute_script(
        "const bar = document.querySelector(arguments[0] + ' .colorbar');"
        "const title = bar.querySelector('.cbtitle').getBoundingClientRect();"
        "const ticks = [...bar.querySelectorAll('.cbaxis text, .ytick text, .tick text')];"
        "if (!ticks.length) throw new Error('no colour bar ticks drawn');"
        "return ticks.map(t => t.getBoundingClientRect()).some(r => !(r.right <= title.left"
        " || r.left >= title.right || r.bottom <= title.top || r.top >= title.bottom));",
        f"#{elem_id}",
    )


def _screenshot(browser, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    browser.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def test_audit_click_draws_the_heatmaps_with_the_audits_numbers(browser, url, models, tmp_path):
    box = _open(browser, url)
    table = (By.ID, "layer-table")  # the page renders in steps: the box can come first
    empty = WebDriverWait(browser, WAIT).until(until.presence_of_element_located(table)).text
    assert "eig_var min" in empty and "1\n2\n3" not in empty  # named columns before an audit
    _type(box, "qk/tiny-bert")
    browser.find_element(By.ID, "audit-button").click()
    for statistic in ("eig_var", "eig_concentration", "eig_mean", "spectral_norm"):
        _wait_for_plot(browser, f"heatmap-{statistic}", "heatmap")
    _wait_for_plot(browser, "eigenvalues", "scatter")
    WebDriverWait(browser, WAIT).until(
        until.text_to_be_present_in_element((By.ID, "headline"), "qk/tiny-bert")
    )
    expected = audit(models.bert)
    (trace,) = _plot_data(browser, "heatmap-eig_var")  # log colour scale by default
    assert trace["type"] == "heatmap" and trace["z"] == _log10(expected.grid("eig_var"))
    assert [[c[0] for c in row] for row in trace["customdata"]] == expected.grid("eig_var")
    assert trace["bar"] == "eig_var<br>(logit², log scale)"
    (mean,) = _plot_data(browser, "heatmap-eig_mean")  # signed: linear
    assert mean["z"] == expected.grid("eig_mean") and mean["bar"] == "eig_mean<br>(logit)"
    # signed statistics on a diverging scale, white at 0; magnitudes on a sequential one
    (concentration,) = _plot_data(browser, "heatmap-eig_concentration")
    for signed in (mean, concentration):
        assert signed["zmid"] == 0 and signed["colorscale"][0] != signed["colorscale"][-1]
        assert [c for p, c in signed["colorscale"] if p == 0.5] == ["rgb(247,247,247)"]
    bound = math.sqrt(16 / 64)  # tiny-bert: d_head 16, d_in 64
    assert (concentration["zmin"], concentration["zmax"]) == (-bound, bound)
    assert concentration["ticktext"][-1] == "+0.5 = +√(d_head/d_in)"
    assert trace["zmid"] is None and trace["colorscale"] != mean["colorscale"]
    for statistic in ("eig_var", "eig_concentration", "eig_mean", "spectral_norm"):
        assert not _title_overlaps_a_tick(browser, f"heatmap-{statistic}"), statistic
    assert "Most concentrated head" in browser.find_element(By.ID, "headline").text
    assert _screenshot(browser, tmp_path, "space-audit").stat().st_size > 10_000
    browser.find_element(By.CSS_SELECTOR, "#log-scale input").click()  # linear colours
    (linear,) = _wait_for_trace(
        browser, "heatmap-eig_var", lambda t: t[0]["z"] == expected.grid("eig_var")
    )
    assert linear["bar"] == "eig_var<br>(logit²)"
    _screenshot(browser, tmp_path, "space-audit-linear")


def test_an_error_stays_in_the_result_area_over_the_previous_result(browser, url, tmp_path):
    box = _open(browser, url)
    _type(box, "qk/tiny-llama")
    browser.find_element(By.ID, "audit-button").click()
    WebDriverWait(browser, WAIT).until(
        until.text_to_be_present_in_element((By.ID, "headline"), "qk/tiny-llama")
    )
    _wait_for_plot(browser, "heatmap-eig_var", "heatmap")
    before = _plot_data(browser, "heatmap-eig_var")
    _type(box, "../etc/<b>passwd</b>")
    browser.find_element(By.ID, "audit-button").click()
    panel = WebDriverWait(browser, WAIT).until(
        until.visibility_of_element_located((By.ID, "audit-error"))
    )
    assert "Error: '../etc/<b>passwd</b>' looks like a local path" in panel.text  # not rendered
    assert not browser.find_elements(By.CSS_SELECTOR, "#audit-error b")
    time.sleep(12)  # a toast would be gone by now; the panel and the previous result stay
    assert browser.find_element(By.ID, "audit-error").is_displayed()
    assert "looks like a local path" in browser.find_element(By.ID, "audit-error").text
    assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid='toast-text']")
    assert "qk/tiny-llama" in browser.find_element(By.ID, "headline").text
    assert _plot_data(browser, "heatmap-eig_var") == before
    _screenshot(browser, tmp_path, "space-error-panel")
    _type(box, "qk/tiny-bert")
    browser.find_element(By.ID, "audit-button").click()
    WebDriverWait(browser, WAIT).until(
        until.text_to_be_present_in_element((By.ID, "headline"), "qk/tiny-bert")
    )
    WebDriverWait(browser, WAIT).until(
        until.invisibility_of_element_located((By.ID, "audit-error"))
    )  # the next run clears it


@pytest.fixture(scope="module")
def t5_repo(hub, tmp_path_factory) -> tuple[str, Path]:
    """A T5 (encoder, decoder and cross attention blocks) on the LocalHub."""
    from transformers import T5Config, T5Model

    folder = tmp_path_factory.mktemp("browser-t5")
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=32, num_layers=2, num_heads=4,
                      decoder_start_token_id=0)  # fmt: skip
    T5Model(config).save_pretrained(folder)
    hub.add_repo("qk/browser-t5", folder)
    return "qk/browser-t5", folder


def test_the_block_selector_switches_every_plot_and_table(browser, url, t5_repo, tmp_path):
    repo, folder = t5_repo
    expected = audit(folder)
    assert expected.blocks == ["encoder", "decoder", "cross"]
    box = _open(browser, url)
    _type(box, repo)
    browser.find_element(By.ID, "audit-button").click()
    _wait_for_trace(
        browser, "heatmap-eig_var",
        lambda t: t[0]["z"] == _log10(expected.grid("eig_var", "encoder")),
    )  # fmt: skip
    choice = browser.find_element(By.CSS_SELECTOR, "#block input")
    choice.click()
    WebDriverWait(browser, WAIT).until(
        until.element_to_be_clickable((By.XPATH, "//li[@role='option'][contains(., 'decoder')]"))
    ).click()
    for statistic in ("eig_var", "spectral_norm"):
        (trace,) = _wait_for_trace(
            browser, f"heatmap-{statistic}",
            lambda t, s=statistic: t[0]["z"] == _log10(expected.grid(s, "decoder")),
        )  # fmt: skip
        assert "decoder attention" in trace["title"]
    (concentration,) = _plot_data(browser, "heatmap-eig_concentration")
    assert concentration["z"] == expected.grid("eig_concentration", "decoder")
    table = browser.find_element(By.ID, "layer-table").text
    assert "decoder" in table and "encoder" not in table and "cross" not in table
    assert "eig_concentration" in table
    eigen = _plot_data(browser, "eigenvalues")
    assert "(decoder)" in eigen[0]["title"]
    _screenshot(browser, tmp_path, "space-block-decoder")


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
    assert attention["title"].endswith("(the most focused)")  # the default head
    layer, head = re.search(r"layer (\d+), head (\d+)", attention["title"]).groups()
    summary = browser.find_element(By.ID, "attention-summary").text
    assert f"Most focused head: layer {layer} head {head}," in summary
    _wait_for_plot(browser, "entropy-scatter", "scatter")
    by_var, by_concentration = _plot_data(browser, "entropy-scatter")
    heads = {(h.layer, h.head): h for h in audit(models.llama).heads}
    (entropy,) = _plot_data(browser, "attention-entropy")
    layers_heads = [tuple(c[:2]) for c in by_var["customdata"]]
    assert layers_heads == sorted(heads)
    assert by_var["x"] == [heads[k].eig_var for k in layers_heads]
    assert by_concentration["x"] == [heads[k].eig_concentration for k in layers_heads]
    assert by_var["y"] == [entropy["z"][layer][head] for layer, head in layers_heads]
    assert "Spearman" in summary
    _screenshot(browser, tmp_path, "space-attention")


def test_the_definitions_contents_links_scroll_to_their_sections(browser, url):
    _open(browser, url)
    browser.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Definitions')]").click()
    WebDriverWait(browser, WAIT).until(
        until.visibility_of_element_located((By.CSS_SELECTOR, "#definitions h2"))
    )
    links = browser.execute_script(
        "return [...document.querySelectorAll('#definitions a')].map(a => a.getAttribute('href'))"
    )
    assert len(links) > 5 and all(link.startswith("#") for link in links)  # in-page only
    missing = [link for link in links if not browser.find_elements(By.ID, link[1:])]
    assert not missing  # every link has its heading
    last = next(link for link in links if "aggregates" in link)
    target = browser.find_element(By.ID, last[1:])
    assert browser.execute_script("return arguments[0].getBoundingClientRect().top", target) > (
        browser.execute_script("return window.innerHeight")
    )  # below the fold before the click
    browser.find_element(By.CSS_SELECTOR, f"#definitions a[href='{last}']").click()
    WebDriverWait(browser, WAIT).until(
        lambda _driver: (
            0
            <= browser.execute_script("return arguments[0].getBoundingClientRect().top", target)
            < browser.execute_script("return window.innerHeight")
        )
    )  # scrolled into view
