"""Headless Chromium for the tests that look at pages as users do (Debian's /usr/bin/chromium via Playwright).

`open_alone_offline` copies a report to a folder of its own, opens it from file:// with the network cut, and
follows every link; every request that would leave file:// (or a data: URI) is recorded and fails the check.
"""

from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
LOCAL_SCHEMES = ("file:", "data:", "about:")


def launch(play):
    assert Path(CHROMIUM).exists(), "Chromium is not installed: `apt-get install -y chromium` (.ci/run does this)"
    return play.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def frame_links(frame) -> list[dict]:
    """Every <a href> of a frame, with whether its #target exists in that frame's document."""
    return frame.evaluate("""() => [...document.querySelectorAll('a[href]')].map(a => {
        const href = a.getAttribute('href');
        if (!href.startsWith('#')) return {href, resolves: false};
        // a browser tries the fragment as written, then percent-decoded (nbconvert writes encoded ids)
        const raw = href.slice(1);
        return {href, resolves: !!(document.getElementById(raw) || document.getElementById(decodeURIComponent(raw)))};
    })""")


def open_alone_offline(index: Path, folder: Path, screenshot: Path | None = None) -> dict:
    """Open a copy of `index` alone in `folder`, offline; click every top-level link. Returns what was seen:
    {"requests_out": [...], "links": [...], "frame_links": [...], "broken": [...], "title": str}."""
    from playwright.sync_api import sync_playwright

    folder.mkdir(parents=True, exist_ok=True)
    alone = folder / "index.html"
    shutil.copy(index, alone)
    assert sorted(p.name for p in folder.iterdir()) == ["index.html"]
    requests_out = []
    with sync_playwright() as play:
        browser = launch(play)
        try:
            context = browser.new_context(offline=True, viewport={"width": 1200, "height": 1400})
            context.route("**/*", lambda route: (requests_out.append(route.request.url), route.abort())
                          if not route.request.url.startswith(LOCAL_SCHEMES) else route.continue_())
            page = context.new_page()
            page.goto(alone.as_uri(), wait_until="load")
            if screenshot is not None:
                page.screenshot(path=str(screenshot))
            links = frame_links(page.main_frame)
            inner = [link for frame in page.frames[1:] for link in frame_links(frame)]
            broken = [link["href"] for link in links + inner if not link["resolves"]]
            anchors = page.locator("a[href]")
            for number in range(anchors.count()):  # follow each link as a reader would: a click
                anchors.nth(number).click()
                assert page.url.startswith(alone.as_uri()), f"link {number} left the file: {page.url}"
            title = page.title()
        finally:
            browser.close()
    return {"requests_out": requests_out, "links": links, "frame_links": inner, "broken": broken, "title": title}
