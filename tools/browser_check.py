#!/usr/bin/env python3
"""Drives `llava serve`'s chat page in headless Chromium through chromedriver's WebDriver API
(standard library only): attaches an image through the page's file input, sets temperature 0 and
max tokens, asks a question, waits for the streamed reply, checks it against the expected text
and saves a screenshot. Started by tools/browser_check.sh, which runs the server and the driver.
"""

import argparse
import base64
import json
import sys
import time
import urllib.request

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


class WebDriver:
    def __init__(self, url):
        self.url = url.rstrip("/")
        self.session = None

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        prefix = f"/session/{self.session}" if self.session else ""
        req = urllib.request.Request(
            self.url + prefix + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.load(r)["value"]
        except urllib.error.HTTPError as e:
            raise SystemExit(f"WebDriver {method} {path}: {e.code} {e.read().decode()[:500]}")

    def start(self, chromium, args):
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}}
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def quit(self):
        if self.session:
            self.call("DELETE", "")
            self.session = None

    def find(self, css):
        return self.call("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def type(self, css, text, clear=False):
        el = self.find(css)
        if clear:
            self.call("POST", f"/element/{el}/clear", {})
        self.call("POST", f"/element/{el}/value", {"text": text})

    def script(self, source, *args):
        return self.call("POST", "/execute/sync", {"script": source, "args": list(args)})


# What the page shows: whether a reply is still streaming, the last reply, errors, images.
STATE = """
const replies = [...document.querySelectorAll('.msg.assistant span')];
return {
  busy: !document.getElementById('stop').hidden,
  reply: replies.length ? replies[replies.length - 1].textContent : null,
  errors: [...document.querySelectorAll('.msg.error')].map((e) => e.textContent),
  user_images: document.querySelectorAll('.msg.user img').length,
  pending_images: document.querySelectorAll('#pending img').length,
  updates: window.__replyUpdates || 0,
};
"""

# Counts the changes to the reply's text as it streams in.
WATCH = """
window.__replyUpdates = 0;
new MutationObserver((records) => {
  for (const r of records) {
    const el = r.target.nodeType === 1 ? r.target : r.target.parentElement;
    if (el && el.closest('.msg.assistant')) window.__replyUpdates++;
  }
}).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
"""


def cache_metrics(page):
    """The prompt cache's hits and reused tokens from /metrics."""
    with urllib.request.urlopen(page.rstrip("/") + "/metrics", timeout=10) as r:
        text = r.read().decode()
    value = lambda name: int(next(
        line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))
    return {"hits": value("llava_prompt_cache_hits_total"),
            "reused": value("llava_prompt_cache_reused_tokens_total")}


def wait(driver, what, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = driver.script(STATE)
        if what(state):
            return state
        time.sleep(0.1)
    raise SystemExit(f"timed out; the page shows {state}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--driver", required=True, help="chromedriver's URL")
    ap.add_argument("--page", required=True, help="the chat page's URL")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--user-data-dir", required=True)
    ap.add_argument("--image", required=True, help="absolute path of the image to attach")
    ap.add_argument("--question", required=True)
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--expected", required=True, help="the reply llava generate gives")
    ap.add_argument("--screenshot", required=True)
    ap.add_argument("--follow-up", help="a second question, which the prompt cache should serve")
    a = ap.parse_args()

    d = WebDriver(a.driver)
    d.start(a.chromium, [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={a.user_data_dir}", "--window-size=1000,760",
    ])
    try:
        d.call("POST", "/url", {"url": a.page})
        d.script(WATCH)
        d.type("#temperature", "0", clear=True)
        d.type("#max-tokens", str(a.max_tokens), clear=True)
        # The file input is hidden behind the "Image…" button; WebDriver sets its files as a
        # user's pick in the dialog would.
        d.type("#file", a.image)
        wait(d, lambda s: s["pending_images"] == 1, 10)
        d.type("#prompt", a.question)
        d.call("POST", f"/element/{d.find('#send')}/click", {})
        state = wait(d, lambda s: s["reply"] is not None and not s["busy"], 120)
        first = state
        if a.follow_up:
            before = cache_metrics(a.page)
            d.type("#prompt", a.follow_up)
            d.call("POST", f"/element/{d.find('#send')}/click", {})
            state = wait(d, lambda s: s["reply"] != first["reply"] and not s["busy"], 120)
            after = cache_metrics(a.page)
        d.script("document.activeElement.blur();")
        png = base64.b64decode(d.call("GET", "/screenshot"))
        with open(a.screenshot, "wb") as f:
            f.write(png)
    finally:
        d.quit()

    print(f"page: {first['user_images']} image(s) in the conversation, "
          f"reply in {first['updates']} update(s), errors {state['errors']}")
    print(f"page reply:     {first['reply']!r}")
    print(f"llava generate: {a.expected!r}")
    ok = (first["reply"] == a.expected and not state["errors"] and state["user_images"] == 1)
    if a.follow_up:
        hits = after["hits"] - before["hits"]
        reused = after["reused"] - before["reused"]
        print(f"follow-up reply: {state['reply']!r}; the prompt cache: {hits} hit, {reused} tokens reused")
        ok = ok and hits == 1 and reused > 0
    print("browser check passed" if ok else "browser check FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
