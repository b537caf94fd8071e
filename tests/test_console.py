"""The web console in a real browser (Debian's headless Chromium through chromedriver and
selenium) against the real proxy: every view is checked against the admin API and the
data, and a screenshot of each is written to .artifacts/console/."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from tests.branchutil import Branches, api_ok, unique
from tests.servers import ProxyProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / ".artifacts" / "console"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
           "chromium-driver)")

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT = 60  # seconds a condition may take on a busy machine; never a measured quantity


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: WebDriver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), path
    assert path.stat().st_size > 10_000  # a rendered page, not an empty image


def wait(driver: WebDriver, condition: Any, message: str) -> Any:
    """Until the condition holds; rows the page re-renders meanwhile are looked up again."""
    return WebDriverWait(driver, WAIT, ignored_exceptions=(StaleElementReferenceException,)
                         ).until(lambda d: condition(d), message)


def row(driver: WebDriver, name: str) -> WebElement | None:
    found = driver.find_elements(By.CSS_SELECTOR, f'#tree tr[data-branch="{name}"]')
    return found[0] if found else None


def cells(element: WebElement) -> list[str]:
    return [td.text for td in element.find_elements(By.TAG_NAME, "td")]


def status_text(driver: WebDriver) -> str:
    return str(driver.find_element(By.ID, "status").text)


def test_console_views(proxy: ProxyProcess, client: MongoClient, made: Branches,
                       browser: WebDriver) -> None:
    db_name = unique("ui").replace("-", "_")
    main = client[db_name].items
    main.insert_many([{"_id": 1, "v": "base"}, {"_id": 2, "v": "base"}])
    parent = made.create(unique("ui-parent"))
    child = made.create(unique("ui-child"), **{"from": parent["name"]})
    masked = made.create(unique("ui-masked"), masked=True)
    with MongoClient(parent["uri"], serverSelectionTimeoutMS=10000) as b:
        b[db_name].items.update_one({"_id": 1}, {"$set": {"v": "branch"}})
        b[db_name].items.insert_one({"_id": 3, "v": "new"})
        b[db_name].items.delete_one({"_id": 2})
    name = parent["name"]
    driver = browser
    try:
        # -- the tree: parent, port, mode, age, size and lifecycle of each branch --------
        with urllib.request.urlopen(proxy.admin_url + "/console/console.js") as r:
            assert "function api(" in r.read().decode()  # served locally, as files
        api_ok(proxy, "PATCH", f"/branches/{name}", {"ttl": "2h", "idle_ttl": "30m",
                                                  "protected": True})
        driver.get(proxy.admin_url + "/")
        assert driver.current_url == proxy.admin_url + "/console/"
        wait(driver, lambda d: row(d, child["name"]) is not None, "the tree never loaded")
        info = api_ok(proxy, "GET", f"/branches/{name}")
        ns = info["namespaces"][f"{db_name}.items"]
        size = f"{ns['changed']} changed · {ns['live']} live · 1 coll."
        wait(driver, lambda d: cells(row(d, name))[5] == size, f"size never became {size}")
        top = cells(row(driver, name))
        assert top[0].endswith(name) and top[1:4] == ["main", str(parent["port"]), "wal"]
        assert re.fullmatch(r"\d+[smhd]", top[4]), top
        assert re.fullmatch(r"protected · expires in (1h|2h|\d+m) · idle 30m", top[6]), top
        below = cells(row(driver, child["name"]))
        assert below[1:3] == [name, str(child["port"])] and below[5] == "no changes"
        assert below[6] == "—"
        assert cells(row(driver, masked["name"]))[6] == "masked"
        api_ok(proxy, "PATCH", f"/branches/{name}", {"protected": False})
        names = [r.get_attribute("data-branch") for r in
                 driver.find_elements(By.CSS_SELECTOR, "#tree tbody tr")]
        assert names.index(child["name"]) == names.index(name) + 1  # nested under its parent
        indent = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#tree .indent")]
        assert len(indent) == len(names) - 1
        shot(driver, "01-tree")

        # -- a branch's log --------------------------------------------------------------
        row(driver, name).click()  # type: ignore[union-attr]
        log = api_ok(proxy, "GET", f"/branches/{name}/log?limit=100")["entries"]
        wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#log tbody tr"))
             == len(log) and status_text(d).startswith("log of"), "the log never showed")
        first = cells(driver.find_element(By.CSS_SELECTOR, "#log tbody tr"))
        assert first[0] == str(log[0]["lsn"]) and first[2] == log[0]["op"]
        assert first[3] == log[0]["ns"]
        assert driver.find_element(By.ID, "detail-uri").text == parent["uri"]
        shot(driver, "02-log")

        # -- its diff, documents side by side ---------------------------------------------
        driver.find_element(By.CSS_SELECTOR, '#tabs [data-tab="diff"]').click()
        diff = api_ok(proxy, "GET", f"/branches/{name}/diff")
        wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#diff .change"))
             == len(diff["changes"]) == 3, "the diff never showed")
        boxes = {b.get_attribute("data-id"): b for b in
                 driver.find_elements(By.CSS_SELECTOR, "#diff .change")}
        assert {c["op"] for c in diff["changes"]} == {"insert", "update", "delete"}
        updated = boxes["1"]
        assert "update" in str(updated.get_attribute("class"))
        assert json.loads(updated.find_element(By.CSS_SELECTOR, ".left pre").text) == {
            "_id": 1, "v": "base"}
        assert json.loads(updated.find_element(By.CSS_SELECTOR, ".right pre").text) == {
            "_id": 1, "v": "branch"}
        assert boxes["2"].find_element(By.CSS_SELECTOR, ".right pre").text == "(none)"
        assert boxes["3"].find_element(By.CSS_SELECTOR, ".left pre").text == "(none)"
        assert "3 change(s) against main" in driver.find_element(By.ID, "diff-summary").text
        shot(driver, "03-diff")

        # -- merge: dry run, a conflict refused, then merged with ours --------------------
        main.update_one({"_id": 1}, {"$set": {"v": "main"}})
        driver.find_element(By.CSS_SELECTOR, '#tabs [data-tab="merge"]').click()
        driver.find_element(By.ID, "merge-dry-run").click()
        wait(driver, lambda d: d.find_elements(By.ID, "merge-outcome"), "no dry run result")
        outcome = driver.find_element(By.ID, "merge-outcome").text
        assert outcome == "Dry run into main: nothing was changed."
        conflicts = driver.find_elements(By.CSS_SELECTOR, "#merge-result .conflict-box")
        assert [c.get_attribute("data-id") for c in conflicts] == ["1"]
        assert json.loads(conflicts[0].find_element(By.CSS_SELECTOR, ".left pre").text)[
            "v"] == "main"
        counts = {cells_row[0]: cells_row[1] for cells_row in (
            [c.text for c in tr.find_elements(By.CSS_SELECTOR, "th, td")]
            for tr in driver.find_elements(By.CSS_SELECTOR, "#merge-counts tr"))}
        assert counts["inserts to apply"] == "1" and counts["conflicts"] == "1"
        shot(driver, "04-merge-dry-run")

        driver.find_element(By.ID, "merge-apply").click()
        wait(driver, lambda d: d.find_element(By.ID, "merge-outcome").text.startswith(
            "Merge aborted"), "the refused merge was not shown")
        assert "error" in str(driver.find_element(By.ID, "status").get_attribute("class"))
        assert sorted(d["_id"] for d in main.find()) == [1, 2]  # nothing was changed
        shot(driver, "05-merge-conflicts")

        Select(driver.find_element(By.ID, "merge-strategy")).select_by_value("ours")
        # Into a protected main (the serve default) only with the force box ticked.
        api_ok(proxy, "PATCH", "/branches/main", {"protected": True})
        try:
            driver.find_element(By.ID, "merge-apply").click()
            wait(driver, lambda d: "branch 'main' is protected" in status_text(d),
                 "the refusal for protection was not shown")
            assert sorted(d["_id"] for d in main.find()) == [1, 2]
            driver.find_element(By.ID, "merge-force").click()
            driver.find_element(By.ID, "merge-apply").click()
            wait(driver, lambda d: status_text(d) == f"Merged {name} into main.",
                 "the merge was not shown")
        finally:
            api_ok(proxy, "PATCH", "/branches/main", {"protected": False})
        assert driver.find_element(By.ID, "merge-outcome").text == f"Merged {name} into main."
        assert list(main.find().sort("_id", 1)) == [{"_id": 1, "v": "branch"},
                                                   {"_id": 3, "v": "new"}]
        shot(driver, "06-merged")

        # -- create a branch from the form -----------------------------------------------
        created = unique("ui-made")
        made.track(created)
        driver.find_element(By.ID, "create-name").send_keys(created)
        Select(driver.find_element(By.ID, "create-from")).select_by_value(name)
        driver.find_element(By.ID, "create").click()
        wait(driver, lambda d: status_text(d).startswith(f"created {created} on port"),
             "no new branch")
        assert driver.find_element(By.ID, "detail-title").text == created
        made_info = api_ok(proxy, "GET", f"/branches/{created}")
        assert made_info["parent"] == name
        assert cells(row(driver, created))[1:3] == [name, str(made_info["port"])]  # type: ignore[arg-type]
        shot(driver, "07-created")

        # An error from the API is shown, not swallowed.
        driver.find_element(By.ID, "create-name").send_keys(created)
        driver.find_element(By.ID, "create").click()
        wait(driver, lambda d: "already exists" in status_text(d), "the error was not shown")
        assert "error" in str(driver.find_element(By.ID, "status").get_attribute("class"))
        shot(driver, "08-error")

        # -- drop it ---------------------------------------------------------------------
        driver.find_element(By.CSS_SELECTOR, '#tabs [data-tab="drop"]').click()
        driver.find_element(By.ID, "drop").click()
        driver.find_element(By.ID, "drop-confirm").click()
        wait(driver, lambda d: status_text(d) == f"dropped {created}", "no drop")
        assert row(driver, created) is None
        assert proxy.api("GET", f"/branches/{created}")[0] == 404
        shot(driver, "09-dropped")
    finally:
        client.drop_database(db_name)


def test_console_sends_the_token_on_every_call(proxy: ProxyProcess,
                                               browser: WebDriver) -> None:
    """One helper makes every API call, and it adds the token typed in the page."""
    driver = browser
    driver.get(proxy.admin_url + "/console/")
    wait(driver, lambda d: status_text(d).endswith(("branch", "branches")), "no tree")
    driver.get_log("performance")  # drop what came before
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys("s3cret-token\n")
    driver.execute_script("document.getElementById('token').dispatchEvent("
                          "new Event('change'))")
    wait(driver, lambda d: any("/branches" in r["url"] for r in _requests(d, keep=True)),
         "no request after setting the token")
    requests = [r for r in _requests(driver) if "/branches" in r["url"]]
    assert requests
    for request in requests:
        headers = {k.lower(): v for k, v in request["headers"].items()}
        assert headers.get("authorization") == "Bearer s3cret-token", request
    assert driver.execute_script(
        "return localStorage.getItem('mongobranch.token')") == "s3cret-token"
    driver.execute_script("localStorage.removeItem('mongobranch.token')")


_SEEN: list[dict[str, Any]] = []


def _requests(driver: WebDriver, keep: bool = False) -> list[dict[str, Any]]:
    """API requests from Chrome's DevTools performance log (Network.requestWillBeSent)."""
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            _SEEN.append(message["params"]["request"])
    out = list(_SEEN)
    if not keep:
        _SEEN.clear()
    return out
