#!/usr/bin/env python3
"""The memory console in a real browser: headless Chromium driven by Selenium against the demo.

    python3 exporter/tests/browser/console_test.py DEMO_BINARY [SCREENSHOT_DIR]

Loads /debug/memory, waits for the scope table (cache, requests, batch, lru with live bytes)
and the overview chart's points, sorts by growth and sees the leaking `cache` first, finds the
demo's leaking function in the flamegraph, takes a 3-second timed profile, runs the `lru`
release probe and reads the bytes it freed; then, against a demo with a debug token, sees the
token prompt, is refused with a wrong token and let in with the right one. Fails on any
JavaScript error in the browser's console; saves a screenshot of each view. Then measures the
page with 1,024 scopes: time to the table, JSON per refresh, /metrics latency open and closed."""
import pathlib
import re
import subprocess
import sys
import tempfile
import time

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

LEAK = 1 << 20  # 1 MiB/s: the cache outgrows every other scope within the first points


def start_demo(binary, *extra):
    demo = subprocess.Popen(
        [binary, "--listen", "127.0.0.1:0", "--leak-rate", str(LEAK), "--batch-every", "4",
         "--batch-bytes", str(8 << 20), "--refresh-interval", "1000", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = demo.stdout.readline()
    match = re.search(r"(http://\S+/debug/memory)", first)
    if not match:
        demo.kill()
        sys.exit(f"the demo's first line is not the console URL: {first!r}")
    return demo, match.group(1)


def browser():
    """Headless Chromium with a new, empty profile (as on a fresh CI machine, whatever the last run
    left in ~/.config) that makes no connections of its own: the machine's network is closed, and
    its first-run and background requests would otherwise be refused many at a time."""
    options = webdriver.ChromeOptions()
    profile = tempfile.TemporaryDirectory(prefix="console-chromium-")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                     "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", f"--user-data-dir={profile.name}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = ChromeService(executable_path="/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    driver.profile = profile  # removed with the driver
    return driver


class Console:
    def __init__(self, driver, shots):
        self.driver, self.shots = driver, shots
        self.errors = []

    def wait(self, what, condition, timeout=60):
        """Polls `condition` until it holds; prints how long that took, or fails with what the
        page showed (its error banner, the browser's log) and a screenshot."""
        began = time.time()
        try:
            result = WebDriverWait(self.driver, timeout, poll_frequency=0.5).until(lambda d: condition())
        except TimeoutException:
            self.screenshot("failed")
            shown = self.driver.execute_script(
                "return ['error', 'heap-summary', 'action-result', 'token-error']"
                ".map(id => id + ': ' + (document.getElementById(id)?.textContent ?? '').trim()).join('\\n')")
            log = "\n".join(entry["message"] for entry in self.driver.get_log("browser"))
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; the page shows\n{shown}\n"
                                 f"browser log:\n{log or '(empty)'}\nscreenshot: {self.shots}/console-failed.png")
        print(f"  {time.time() - began:5.1f} s  {what}", flush=True)
        return result

    def view(self, name):
        self.driver.find_element(By.CSS_SELECTOR, f'nav button[data-view="{name}"]').click()

    def screenshot(self, name):
        self.shots.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(self.shots / f"console-{name}.png"))

    def check_console_log(self):
        """JavaScript errors fail the test; failed requests (the 401 the token test provokes)
        are the network's, which the page shows in its own words."""
        for entry in self.driver.get_log("browser"):
            if entry["level"] == "SEVERE" and entry.get("source") != "network":
                self.errors.append(entry["message"])
        assert not self.errors, "JavaScript errors:\n" + "\n".join(self.errors)

    def rows(self):
        """The scope table as shown: name, live, change over 1 m, 5 m, 60 m, allocated per second."""
        return self.driver.execute_script(
            "return [...document.querySelectorAll('#scopes tbody tr')].map(tr => "
            "[tr.dataset.scope, ...[...tr.cells].slice(1, 6).map(td => td.textContent)])")

    def result_text(self):
        return self.driver.find_element(By.ID, "action-result").text


def parse_bytes(text):
    match = re.match(r"([+-]?[\d.]+) (B|KiB|MiB|GiB)", text.strip())
    assert match, text
    return float(match.group(1)) * 1024 ** ["B", "KiB", "MiB", "GiB"].index(match.group(2))


def the_demo_in_the_console(binary, shots):
    demo, url = start_demo(binary)
    driver = browser()
    console = Console(driver, shots)
    try:
        started = time.time()
        driver.get(url)
        seen = set()

        def all_scopes_live():
            # `requests` allocates fast but holds little for long: in sampled mode its live estimate
            # is often 0 (no sampled block alive at the reading), so it is seen by its rate.
            rows = console.rows()
            seen.update(name for name, live, *_ in rows if parse_bytes(live) > 0)
            seen.update(name + "/s" for name, *_, rate in rows if parse_bytes(rate) > 0)
            return {"cache", "batch", "lru", "requests/s"} <= seen
        console.wait("cache, batch and lru with live bytes, requests allocating", all_scopes_live)
        console.wait("points in the overview chart", lambda: int(
            driver.find_element(By.ID, "overview-chart").get_attribute("data-points")) >= 2)
        print(f"table and chart filled {time.time() - started:.1f} s after loading the page")
        console.screenshot("overview")

        # Growth: the leak is the biggest grower once there are a few points.
        console.view("scopes")
        header = driver.find_element(By.CSS_SELECTOR, 'th[data-sort="change_1m"]')
        header.click()
        console.wait("cache first by growth", lambda: console.rows()[0][0] == "cache", timeout=90)
        growth = parse_bytes(console.rows()[0][2])
        assert growth > 0, console.rows()[0]
        console.screenshot("scopes")

        # The flamegraph names the leaking function; a search highlights it.
        console.view("heap")
        console.wait("the flamegraph", lambda: driver.find_elements(By.CSS_SELECTOR, "#flame .frame"))
        search = driver.find_element(By.ID, "heap-search")
        search.send_keys("leak_sessions")
        console.wait("a frame of demo::...::leak_sessions highlighted",
                     lambda: driver.find_elements(By.CSS_SELECTOR, "#flame .frame.match"), 10)
        # "Only the program's own frames" (on by default) hides the standard library's, also its
        # impls for primitive types, and the tracker's scope futures: under the cache's scope,
        # whose every stack has the program's leak_sessions, no such frame remains.
        cache_frames = driver.execute_script(
            "const walk = (n) => [n.name, ...[...n.children.values()].flatMap(walk)];"
            "return [...state.flame.children.get('[scope cache]').children.values()].flatMap(walk)")
        assert any("leak_sessions" in name for name in cache_frames), cache_frames
        hidden = [name for name in cache_frames
                  if re.match(r"<(tracking_alloc::|[\w\[\]]+ as (std|core|alloc|<\[_\]>)::)", name)]
        assert not hidden, f"frames of the standard library or the tracker shown: {hidden}"
        console.screenshot("heap")

        # A timed profile from the page.
        search.clear()
        Select(driver.find_element(By.ID, "heap-source")).select_by_value("timed")
        seconds = driver.find_element(By.ID, "heap-seconds")
        seconds.clear()
        seconds.send_keys("3")
        driver.find_element(By.ID, "heap-load").click()
        console.wait("the progress bar", lambda: driver.find_element(By.ID, "heap-progress").is_displayed(), 5)
        console.wait("the timed profile", lambda: "gained during 3 s" in driver.find_element(By.ID, "heap-summary").text, 30)
        console.wait("its flamegraph", lambda: driver.find_elements(By.CSS_SELECTOR, "#flame .frame"))
        console.screenshot("heap-timed")

        # The lru release probe, confirmed, frees bytes.
        console.view("actions")
        Select(driver.find_element(By.ID, "probe")).select_by_value("lru")
        driver.find_element(By.ID, "run-probe").click()
        driver.find_element(By.ID, "confirm-yes").click()
        console.wait("the probe's report", lambda: "lru: freed" in console.result_text(), 30)
        freed = parse_bytes(console.result_text().split("freed ")[1])
        assert freed > 0, console.result_text()
        # A stored dump appears in the table with its downloads.
        driver.find_element(By.ID, "store-dump").click()
        driver.find_element(By.ID, "confirm-yes").click()
        console.wait("the stored dump", lambda: driver.find_elements(By.CSS_SELECTOR, "#dumps tbody tr"), 30)
        console.screenshot("actions")
        console.check_console_log()
        print(f"cache grew {growth:.0f} B in its row; lru probe freed {freed:.0f} B")
    finally:
        driver.quit()
        demo.kill()


def the_token_prompt(binary, shots):
    demo, url = start_demo(binary, "--debug-token", "console-s3cret")
    driver = browser()
    console = Console(driver, shots)
    try:
        driver.get(url)
        prompt = driver.find_element(By.ID, "token-form")
        console.wait("the token prompt", prompt.is_displayed, 20)
        assert not driver.find_elements(By.CSS_SELECTOR, "#cards .card"), "data shown without a token"
        driver.find_element(By.ID, "token-input").send_keys("wrong")
        driver.find_element(By.ID, "token-submit").click()
        console.wait("the refusal", lambda: "refused" in driver.find_element(By.ID, "token-error").text, 20)
        console.screenshot("token-refused")
        driver.find_element(By.ID, "token-input").send_keys("console-s3cret")
        driver.find_element(By.ID, "token-submit").click()
        console.wait("the data", lambda: driver.find_elements(By.CSS_SELECTOR, "#cards .card"), 20)
        assert not prompt.is_displayed()
        console.check_console_log()
    finally:
        driver.quit()
        demo.kill()


def with_1024_scopes(binary, shots):
    """The page with a full registry: time from load to the table drawn, the JSON per refresh,
    and /metrics latency with the page open and closed (reported, not asserted: shared machine)."""
    import json
    import statistics
    import urllib.request
    demo, url = start_demo(binary, "--extra-scopes", "1100", "--tracking", "exact")
    base = url.rsplit("/debug/memory", 1)[0]
    driver = browser()
    console = Console(driver, shots)

    def scrape_ms(n=40):
        times = []
        for _ in range(n):
            began = time.perf_counter()
            urllib.request.urlopen(base + "/metrics").read()
            times.append((time.perf_counter() - began) * 1000)
            time.sleep(0.05)
        return statistics.median(times)
    try:
        closed = scrape_ms()
        driver.get(url)
        console.wait("1,024 scope rows", lambda: len(console.rows()) >= 1024, 60)
        first = int(driver.execute_script("return document.body.dataset.firstTableMs"))
        time.sleep(6)  # a refresh
        render = float(driver.execute_script("return document.body.dataset.renderMs"))
        opened = scrape_ms()
        sizes = {}
        for path in ("/debug/memory/scopes", "/debug/memory/scopes?spark=0", "/debug/memory/overview?since=0"):
            plain = len(urllib.request.urlopen(base + path).read())
            gzipped = len(urllib.request.urlopen(urllib.request.Request(
                base + path, headers={"Accept-Encoding": "gzip"})).read())
            sizes[path] = (plain, gzipped)
        newest = json.loads(urllib.request.urlopen(base + "/debug/memory/overview?since=0").read())["points"][-1]["t"]
        sizes["/debug/memory/overview?since=<newest>"] = (len(
            urllib.request.urlopen(base + f"/debug/memory/overview?since={newest}").read()), 0)
        console.screenshot("1024-scopes")
        console.check_console_log()
        assert len(console.rows()) == 1024, len(console.rows())
        print(f"1,024 scopes: table drawn {first} ms after navigation, a refresh renders in {render:.0f} ms; "
              f"/metrics median {closed:.1f} ms with the page closed, {opened:.1f} ms open")
        for path, (plain, gzipped) in sizes.items():
            print(f"  {path}: {plain / 1024:.1f} KiB" + (f", {gzipped / 1024:.1f} KiB gzipped (what a browser gets)" if gzipped else ""))
    finally:
        driver.quit()
        demo.kill()


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    binary = sys.argv[1]
    shots = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "target/console")
    for part in (the_demo_in_the_console, the_token_prompt, with_1024_scopes):
        print(part.__name__.replace("_", " "), flush=True)
        part(binary, shots)
    print(f"console: all checks passed; screenshots in {shots}/")


if __name__ == "__main__":
    main()
