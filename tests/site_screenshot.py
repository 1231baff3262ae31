"""``make docs-screenshots``: the built documentation site as a browser renders it.

Serves ``build/site`` (``make docs``) over HTTP on a free local port and saves a PNG of
each page with headless Chromium (Qt WebEngine, offscreen), so that what the site looks
like can be checked without a display: the theme's CSS and JavaScript, the navigation,
the API reference that mkdocstrings generated.

    python tests/site_screenshot.py [--site build/site] [--out build/site-screenshots] [PAGE ...]

PAGE is a path under the site (default: the home page and the API reference).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import sys
import threading
from pathlib import Path
from typing import List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("", "api/")
#: a page's scripts (search index, code highlighting) run this long before the shot
SETTLE_MS = 2500
LOAD_TIMEOUT_MS = 30000


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


def _serve(site: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def screenshot(urls: Sequence[str], paths: Sequence[Path], width: int = 1280, height: int = 900) -> List[bool]:
    """Load each URL in one offscreen Chromium view and save it to the matching path;
    True for each page that loaded."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("QTWEBENGINE_CHROMIUM_FLAGS", "--no-sandbox --disable-gpu")
    try:
        from PyQt6.QtCore import QSize, QTimer, QUrl
        from PyQt6.QtWebEngineWidgets import QWebEngineView
        from PyQt6.QtWidgets import QApplication
    except ImportError as exc:
        raise SystemExit(f"needs PyQt6-WebEngine (make docs-screenshots installs it): {exc}")
    app = QApplication(sys.argv[:1])
    view = QWebEngineView()
    view.resize(QSize(width, height))
    loaded: List[bool] = []
    pending = list(zip(urls, paths))

    def next_page() -> None:
        if not pending:
            app.quit()
            return
        url, _ = pending[0]
        view.load(QUrl(url))

    def on_loaded(ok: bool) -> None:
        def save() -> None:
            _, path = pending.pop(0)
            view.grab().save(str(path))
            loaded.append(ok)
            print(f"{'saved ' if ok else 'FAILED'} {path}", flush=True)
            next_page()
        QTimer.singleShot(SETTLE_MS, save)

    view.loadFinished.connect(on_loaded)
    view.show()
    QTimer.singleShot(LOAD_TIMEOUT_MS * max(1, len(urls)), app.quit)
    next_page()
    app.exec()
    return loaded + [False] * (len(urls) - len(loaded))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/site_screenshot.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--site", type=Path, default=ROOT / "build" / "site")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "site-screenshots")
    p.add_argument("pages", nargs="*", default=list(PAGES))
    args = p.parse_args(argv)
    if not (args.site / "index.html").exists():
        p.error(f"--site {args.site} holds no index.html: run `make docs` first")
    args.out.mkdir(parents=True, exist_ok=True)
    server = _serve(args.site)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    names = [(page.strip("/").replace("/", "-") or "home") + ".png" for page in args.pages]
    try:
        ok = screenshot([base + page for page in args.pages], [args.out / n for n in names])
    finally:
        server.shutdown()
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
