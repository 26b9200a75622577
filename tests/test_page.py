"""The leaderboard page in a real headless Chromium: sorting, filters, method cards and manifests, no script errors.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package; without them the browser tests
skip, unless ``MARBENCH_REQUIRE_BROWSER=1`` (then they fail). ``MARBENCH_PAGE_SCREENSHOT=<file.png>`` also saves a
screenshot of the test page there.
"""
import json
import os
import shutil
from pathlib import Path

import pytest

from marbench import leaderboard
from marbench.evaluation.records import Record
from marbench.leaderboard import build_leaderboards
from marbench.method import PaperTable

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# record text that would end the data block if it were embedded unescaped
HOSTILE = "</script><script>window.__pwned = 1;</script><!-- <script>"
GIT_SHA = "0123456789abcdef0123456789abcdef01234567"
# method -> (rmse_hu, psnr, ssim) base values: the rmse, psnr and alphabetical orders all differ
METHODS = {"uncorrected": (90.0, 30.0, 0.90), "li": (40.0, 33.0, 0.95), "zeta": (60.0, 38.0, 0.93),
           "beam": (20.0, 31.0, 0.97)}
PAPER = PaperTable("toy-ablation", "Author et al., Table 2", "alpha", (("li", "LI"), ("zeta", "Zeta")),
                   {"LI": {"rmse_hu": 41.0, "psnr": 33.1}, "Zeta": {"rmse_hu": 58.0, "psnr": 37.0}},
                   order_metric="rmse_hu")
SLICES = [(f"s{i}", ("head", "knee")[i % 2]) for i in range(6)]


def _spec(name, higher, unit, digits, level="slice"):
    return {"name": name, "higher_is_better": higher, "unit": unit, "digits": digits, "level": level,
            "description": f"{name} of the toy protocol", "figure": True}


PROTOCOLS = {"alpha": [_spec("rmse_hu", False, "HU", 2), _spec("psnr", True, "dB", 2),
                       _spec("fid", False, "", 1, level="set")],
             "beta": [_spec("ssim", True, "", 4)]}


def _record(method, protocol, seed=0):
    rmse, psnr, ssim = METHODS[method]
    base = {"rmse_hu": rmse, "psnr": psnr, "ssim": ssim}
    slices = []
    for i, (sid, cat) in enumerate(SLICES):
        row = {"slice_id": sid, "category": cat, "seconds": 0.1 + 0.01 * i}
        for spec in PROTOCOLS[protocol]:
            if spec["level"] == "slice":
                row[spec["name"]] = base[spec["name"]] * (1 + 0.01 * ((i * 7) % 5 - 2) + 0.002 * seed)
        slices.append(row)
    names = [s["name"] for s in PROTOCOLS[protocol] if s["level"] == "slice"] + ["seconds"]

    def stats(rows):
        return {m: {"mean": sum(r[m] for r in rows) / len(rows), "std": 0.0, "n": len(rows)} for m in names}

    card = {"name": method, "paper": f"Author et al., 'The {method} method', 2024", "inputs": ["ma_image"],
            "trainable": method == "zeta", "training_inputs": [], "puts_metal_back": True, "metal": "put back",
            "departures": [HOSTILE] if method == "li" else [], "weights": {}}
    return Record(
        method=card,
        dataset={"name": "toy", "root": "data/toy", "split": "split.txt", "split_sha256": "ab" * 32,
                 "data_manifest_sha256": "cd" * 32, "slices": len(slices)},
        protocol={"name": protocol, "version": "1", "metrics": PROTOCOLS[protocol], "weights_sha256": {}},
        seed=seed,
        metrics={"overall": stats(slices),
                 "per_category": {c: stats([s for s in slices if s["category"] == c]) for c in ("head", "knee")},
                 "set": {"fid": 10.0 + rmse / 10} if protocol == "alpha" else {}},
        slices=slices,
        manifest={"git_sha": GIT_SHA, "git_dirty": False, "config": {"note": HOSTILE}, "packages": {},
                  "python": "3.11", "platform": "test", "seed": seed, "device": "cpu", "world_size": 1,
                  "timings": {"evaluation_s": 1.0}},
    )


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    root = tmp_path_factory.mktemp("page-board")
    for protocol in PROTOCOLS:
        for method in METHODS:
            _record(method, protocol).write(root / "results")
    _record("li", "alpha", seed=1).write(root / "results")
    _build(root)
    return root


def _build(root):
    with pytest.MonkeyPatch.context() as mp:  # the toy rows' paper table, not the registry's
        mp.setattr(leaderboard, "_paper_tables", lambda: [PAPER])
        build_leaderboards(root)


def test_the_page_is_deterministic_and_record_text_cannot_leave_the_data_block(board, tmp_path):
    shutil.copytree(board / "results", tmp_path / "results")
    _build(tmp_path)
    page = (board / "index.html").read_text()
    assert (tmp_path / "index.html").read_text() == page
    block = page.split('id="marbench-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in block  # so the block ends where the page means it to, and holds all the data
    assert json.loads(block)["records"]["toy__li__alpha__seed0.json"]["manifest"]["config"]["note"] == HOSTILE
    assert "src=\"figures/toy__alpha.png\"" in page and "https:" not in page and "http:" not in page


def _require_browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = (f"browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver; "
                  "pip install 'selenium>=4.20')")
        if os.environ.get("MARBENCH_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # the networking flags keep Chromium from calling home on a closed network
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path keeps selenium-manager from downloading one
    d = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield d
    d.quit()


def _column(driver, table_id, header):
    table = driver.find_element("id", table_id)
    heads = [th.text.rstrip(" ↕▲▼") for th in table.find_elements("css selector", "thead th")]
    return table, heads.index(header)


def _order(table, col):
    rows = table.find_elements("css selector", "tbody tr")
    return ([r.find_element("css selector", "th").get_attribute("data-sort") for r in rows],
            [r.find_elements("css selector", "th, td")[col].get_attribute("data-sort") for r in rows])


def test_sort_filter_cards_and_no_script_errors(board, driver, tmp_path):
    from selenium.webdriver.support.ui import Select

    driver.get((board / "index.html").as_uri())
    assert driver.title == "marbench leaderboard"
    paper = driver.find_element("css selector", "#toy__alpha .paper")
    assert paper.is_displayed() and "toy-ablation" in paper.text and "41.00" in paper.text

    table, col = _column(driver, "t-toy__alpha", "psnr ↑")
    button = table.find_elements("css selector", "thead th button")[col]
    button.click()  # a higher-is-better metric: best first
    names, keys = _order(table, col)
    assert names == ["zeta", "li", "beam", "uncorrected"]
    assert [float(k) for k in keys] == sorted((float(k) for k in keys), reverse=True)
    button.click()
    assert _order(table, col)[0] == ["uncorrected", "beam", "li", "zeta"]
    rmse = table.find_elements("css selector", "thead th button")[_column(driver, "t-toy__alpha", "rmse_hu ↓")[1]]
    rmse.click()  # lower is better: smallest first
    assert _order(table, _column(driver, "t-toy__alpha", "rmse_hu ↓")[1])[0] == ["beam", "li", "zeta", "uncorrected"]
    table.find_elements("css selector", "thead th button")[0].click()
    assert _order(table, 0)[0] == ["beam", "li", "uncorrected", "zeta"]

    if os.environ.get("MARBENCH_PAGE_SCREENSHOT"):
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, min(int(height) + 100, 6000))
        driver.save_screenshot(os.environ["MARBENCH_PAGE_SCREENSHOT"])
        driver.set_window_size(1400, 1000)

    Select(driver.find_element("id", "filter-protocol")).select_by_value("beta")
    assert not driver.find_element("id", "toy__alpha").is_displayed()
    assert driver.find_element("id", "toy__beta").is_displayed()
    Select(driver.find_element("id", "filter-category")).select_by_value("knee")
    assert driver.find_element("id", "t-toy__beta--knee").is_displayed()
    assert not driver.find_element("id", "t-toy__beta").is_displayed()  # the all-slices table
    assert not driver.find_element("id", "t-toy__alpha--knee").is_displayed()
    Select(driver.find_element("id", "filter-protocol")).select_by_value("*")
    Select(driver.find_element("id", "filter-category")).select_by_value("")
    assert driver.find_element("id", "toy__alpha").is_displayed()

    li = driver.find_element("css selector", "#toy__alpha tbody th button.method[data-records*='toy__li__']")
    assert li.text == "li"
    li.click()
    dialog = driver.find_element("id", "card")
    assert dialog.is_displayed()
    assert "The li method" in dialog.text and HOSTILE in dialog.text
    manifests = dialog.find_elements("css selector", "details.manifest")
    assert len(manifests) == 2  # li has two training seeds here
    manifests[0].find_element("css selector", "summary").click()
    pre = manifests[0].find_element("css selector", "pre")
    assert pre.is_displayed() and GIT_SHA in pre.text
    assert driver.execute_script("return window.__pwned") is None

    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
