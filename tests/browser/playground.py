"""The playground page (GET /) in a real headless Chromium, driven by selenium.

    python tests/browser/playground.py --bin target/debug/diffit-server [--screenshot docs/playground.png]

Starts the server twice on 127.0.0.1 (the embedded model, CPU): once open, once with an API
key; then once with two models (the embedded one and the tiny test fixture), where the page offers
a model selector and each model generates at its own size with its own classes. Each run loads the page, searches a class by a synonym, generates, and checks what a person
would see: the progress bar while it runs, previews, then <img> elements in the region labelled
Results at the model's own size; no console error; no request leaving the server's origin; the
"copy as curl" request reproducing the shown image byte for byte; arrow keys moving through the
grid. Exits non-zero on the first failed check; prints one line per check and a summary.
"""

import argparse
import base64
import json
import os
import subprocess
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
PASSED = []


def check(cond, what):
    if not cond:
        print(f"FAIL  {what}", flush=True)
        raise SystemExit(1)
    PASSED.append(what)
    print(f"ok    {what}", flush=True)


def wait_for(pred, timeout, what, interval=0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            PASSED.append(what)
            print(f"ok    {what}", flush=True)
            return v
        time.sleep(interval)
    check(False, f"{what} (waited {timeout} s)")


class Server:
    def __init__(self, binary, extra):
        self.proc = subprocess.Popen(
            [binary, "serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "RUST_LOG": "warn"})
        line = self.proc.stdout.readline()
        self.base = line.strip().rsplit(" ", 1)[-1]
        check(self.base.startswith("http://127.0.0.1:"), f"server listens on {self.base}")
        wait_for(self.ready, 120, "server ready", 0.1)

    def ready(self):
        try:
            return urllib.request.urlopen(self.base + "/readyz", timeout=2).status == 200
        except Exception:
            return False

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1440,1040", "--hide-scrollbars", "--force-device-scale-factor=1",
              "--no-first-run", "--disable-extensions", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--disable-default-apps"]:
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def field(d, label):
    """The control a visible <label> names."""
    lab = d.find_element(By.XPATH, f"//label[normalize-space(.)='{label}']")
    check(lab.is_displayed(), f"label '{label}' is visible")
    return d.find_element(By.ID, lab.get_attribute("for"))


def results_images(d):
    return d.execute_script("""
      const region = document.querySelector('[aria-label="Results"]');
      return [...region.querySelectorAll('img')].map(i => [i.complete, i.naturalWidth, i.naturalHeight]);""")


def blob_bytes(d, url):
    b64 = d.execute_async_script("""
      const [url, done] = arguments;
      fetch(url).then(r => r.arrayBuffer()).then(b => {
        let s = ''; new Uint8Array(b).forEach(x => s += String.fromCharCode(x)); done(btoa(s)); });""",
                                 url)
    return base64.b64decode(b64)


def console_errors(d):
    return [e for e in d.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def foreign_requests(d, origin):
    """Every URL the page asked for (DevTools network log and resource timing) outside its origin."""
    urls = set(d.execute_script(
        "return performance.getEntries().map(e => e.name).filter(n => /^[a-z]+:/.test(n))"))
    for entry in d.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            urls.add(msg["params"]["request"]["url"])
    return sorted(u for u in urls
                  if not (u.startswith(origin + "/") or u == origin or u.startswith(("data:", "blob:"))))


def generate_and_check(d, server, model, query, expect_class, n, label):
    cls = field(d, "Class")
    cls.clear()
    cls.send_keys(query)
    options = wait_for(lambda: [o for o in d.find_elements(By.CSS_SELECTOR, "#class-list [role=option]")
                                if o.is_displayed()], 5, f"{label}: search '{query}' lists classes")
    check(expect_class in options[0].text, f"{label}: '{query}' finds {expect_class} first ({options[0].text!r})")
    cls.send_keys(Keys.ENTER)
    check(cls.get_attribute("value") == expect_class, f"{label}: Enter picks {expect_class}")
    images = field(d, "Images")
    images.clear()
    images.send_keys(str(n))
    before = len(results_images(d))
    # Watch the page from here on, so that a fast server cannot finish between two polls: was
    # a progress bar laid out (visible), how far did it go, how many previews were drawn.
    d.execute_script("""
      const seen = window.__seen = { progress: false, maxStep: 0, previews: 0 };
      const look = () => {
        const p = document.querySelector('progress, [role=progressbar]');
        if (p && p.offsetParent !== null) {
          seen.progress = true;
          seen.maxStep = Math.max(seen.maxStep, Number(p.value || p.getAttribute('aria-valuenow') || 0));
        }
      };
      new MutationObserver((records) => {
        look();
        for (const r of records)
          if (r.attributeName === 'data-drawn') seen.previews++;  // a preview PNG decoded and drawn
      }).observe(document.body, { attributes: true, subtree: true, childList: true });""")
    d.find_element(By.XPATH, "//button[normalize-space(.)='Generate']").click()
    if os.environ.get("PREVIEW_SHOT"):
        wait_for(lambda: d.execute_script("return window.__seen.previews > 0"), 60, f"{label}: a preview shows")
        d.save_screenshot(os.environ["PREVIEW_SHOT"])
    side = model["image_size"]
    wait_for(lambda: len([i for i in results_images(d) if i[0] and i[1] == side and i[2] == side]) >= before + n,
             300, f"{label}: {n} images of {side}x{side} px land in Results")
    seen = d.execute_script("return window.__seen")
    steps = int(field(d, "Steps").get_attribute("value"))
    check(seen["progress"], f"{label}: a progress bar showed while the request ran")
    check(seen["maxStep"] >= steps - 1, f"{label}: progress reached step {seen['maxStep']} of {steps}")
    check(seen["previews"] >= n, f"{label}: {seen['previews']} live previews drawn for {n} images")
    check(not d.find_element(By.ID, "status").is_displayed(), f"{label}: the progress bar goes away")
    first = d.find_element(By.CSS_SELECTOR, "[aria-label=Results] .card")
    check(expect_class in first.text and "seed" in first.text, f"{label}: the card shows class and seed")
    return first


def reproduce_with_curl(d, server, card, key):
    """Runs the card's "copy as curl" request and compares bytes with the card's download."""
    link = card.find_element(By.LINK_TEXT, "Download")
    shown = blob_bytes(d, link.get_attribute("href"))
    curl = d.execute_script("return arguments[0].dataset.curl", card)
    body = curl.split(" -d '", 1)[1].split("'", 1)[0]
    headers = {"Accept": "image/png", "Content-Type": "application/json"}
    if key:
        check("$DIFFIT_API_KEY" in curl and key not in curl, "curl names the key by variable, never the key")
        headers["Authorization"] = "Bearer " + key
    req = urllib.request.Request(server.base + "/generate", data=body.encode(), headers=headers)
    got = urllib.request.urlopen(req, timeout=120).read()
    check(got == shown and got[:4] == b"\x89PNG", "copy as curl reproduces the shown PNG byte for byte")


def imagenet_search(d):
    """The page's class search at ImageNet's scale: the 1000 classes (names and synonyms from
    assets/imagenet_classes.tsv) replace the embedded model's 10 in the page, then a person types."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    classes = []
    with open(os.path.join(root, "assets", "imagenet_classes.tsv")) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            label, _, names = line.rstrip("\n").split("\t")
            names = names.split(", ")
            classes.append({"label": int(label), "name": names[0], "synonyms": names[1:]})
    d.execute_script("""state.classes = arguments[0].map(c => ({...c, keys: [c.name, ...c.synonyms].map(norm)}));
                        state.picked = null;""", classes)
    cls = field(d, "Class")
    for query, first in [("retriever", "golden retriever"), ("Golden", "golden retriever"),
                         ("hot dog", "hotdog"), ("207", "golden retriever"), ("tabby", "tabby")]:
        cls.clear()
        cls.send_keys(query)
        opts = wait_for(lambda: [o.text for o in d.find_elements(By.CSS_SELECTOR, "#class-list [role=option]")
                                 if o.is_displayed()], 5, f"ImageNet search '{query}' lists classes")
        check(opts[0].split("\n")[0] == first, f"ImageNet search '{query}' finds {first} first ({opts[:3]})")


def run(binary, key, screenshot):
    label = "with API key" if key else "open"
    server = Server(binary, ["--api-key", key] if key else [])
    d = browser()
    try:
        d.get(server.base + "/")
        if key:
            key_box = wait_for(lambda: d.find_element(By.ID, "api-key").is_displayed() and field(d, "API key"),
                               10, f"{label}: the page asks for an API key")
            check(d.execute_script("return performance.getEntriesByType('resource').length") == 0,
                  f"{label}: no API request before the key is given")
            key_box.send_keys(key + Keys.ENTER)
        model_req = urllib.request.Request(server.base + "/v1/models",
                                           headers={"Authorization": "Bearer " + key} if key else {})
        model = json.load(urllib.request.urlopen(model_req))["data"][0]
        wait_for(lambda: d.find_element(By.ID, "model-id").text == model["id"], 20,
                 f"{label}: the page shows the model {model['id']}")
        check(field(d, "Steps").get_attribute("value") == str(model["defaults"]["steps"]),
              f"{label}: steps prefilled with the model's default")
        card = generate_and_check(d, server, model, "trainer", "Sneaker", 3, label)
        reproduce_with_curl(d, server, card, key)
        if not key:
            card.click()
            d.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
            cards = d.find_elements(By.CSS_SELECTOR, "[aria-label=Results] .card")
            check(d.switch_to.active_element == cards[1], "arrow keys move through the results grid")
            generate_and_check(d, server, model, "boot", "Ankle boot", 5, label)
        errors = console_errors(d)
        check(not errors, f"{label}: no console errors {errors}")
        foreign = foreign_requests(d, server.base)
        check(not foreign, f"{label}: no request outside {server.base} {foreign}")
        if screenshot:
            d.execute_script("window.scrollTo(0, 0); document.activeElement.blur()")
            time.sleep(0.3)
            d.save_screenshot(screenshot)
            print(f"screenshot: {screenshot}")
        if key:
            # A wrong key: the page says so in words, inline.
            d.execute_script("sessionStorage.clear()")
            d.get(server.base + "/")
            box = wait_for(lambda: d.find_element(By.ID, "api-key"), 10, "key form again")
            box.send_keys("wrong-key" + Keys.ENTER)
            wait_for(lambda: "API key" in d.find_element(By.ID, "error").text, 10,
                     f"{label}: a wrong key is reported inline ({d.find_element(By.ID, 'error').text!r})")
        # Bad input is explained next to the form, naming the field.
        if not key:
            steps = field(d, "Steps")
            steps.clear()
            steps.send_keys("1")
            d.find_element(By.XPATH, "//button[normalize-space(.)='Generate']").click()
            wait_for(lambda: "between 2 and" in d.find_element(By.ID, "error").text, 10,
                     f"{label}: a 422 is shown inline ({d.find_element(By.ID, 'error').text!r})")
            check(steps.get_attribute("aria-invalid") == "true", f"{label}: the Steps field is marked invalid")
            imagenet_search(d)
    finally:
        d.quit()
        server.stop()


def run_two_models(binary):
    """Two models: a selector lists both; switching reloads defaults, classes and size."""
    label = "two models"
    fixtures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
    tiny = (f"tiny={os.path.join(fixtures, 'diffit_tiny_model.safetensors')},"
            f"vae={os.path.join(fixtures, 'vae_tiny_model.safetensors')},steps=4")
    server = Server(binary, ["--model", "fashion=embedded,steps=10", "--model", tiny])
    d = browser()
    try:
        d.get(server.base + "/")
        models = {m["id"]: m for m in json.load(urllib.request.urlopen(server.base + "/v1/models"))["data"]}
        wait_for(lambda: d.find_element(By.ID, "model-field").is_displayed(), 20,
                 f"{label}: the page offers a model selector")
        select = Select(field(d, "Model"))
        names = [o.get_attribute("value") for o in select.options]
        check(names == ["fashion", "tiny"], f"{label}: the selector lists both models {names}")
        wait_for(lambda: d.find_element(By.ID, "model-id").text == "fashion", 20, f"{label}: fashion first")
        generate_and_check(d, server, models["fashion"], "trainer", "Sneaker", 1, label + " (fashion)")
        select.select_by_value("tiny")
        wait_for(lambda: d.find_element(By.ID, "model-id").text == "tiny", 20, f"{label}: switched to tiny")
        wait_for(lambda: field(d, "Steps").get_attribute("value") == "4", 10,
                 f"{label}: steps prefilled with tiny's default")
        # Clear the fashion image: the count of images at tiny's size starts from zero.
        d.find_element(By.ID, "clear").click()
        generate_and_check(d, server, models["tiny"], "class 3", "class 3", 2, label + " (tiny)")
        errors = console_errors(d)
        check(not errors, f"{label}: no console errors {errors}")
    finally:
        d.quit()
        server.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/diffit-server")
    ap.add_argument("--screenshot", default=None)
    a = ap.parse_args()
    t0 = time.monotonic()
    run(a.bin, None, a.screenshot)
    run(a.bin, "browser-test-key", None)
    run_two_models(a.bin)
    print(f"{time.monotonic() - t0:.0f} s")
    print(f"{len(PASSED)} passed, 0 failed")


if __name__ == "__main__":
    sys.exit(main())
