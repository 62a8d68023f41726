"""Render an HTML report (`sanitize ... --report-html r.html`) in headless Chromium and save a PNG screenshot.

    python scripts/screenshot_report.py r.html r.png [--width 1200 --height 2000]

Checks that the page opens in a real browser as a reviewer would see it. Chromium is not a dependency of the
project (Debian: apt-get install chromium); without it this exits 9 with that hint. The browser runs with
networking features off and a throwaway profile, so a page that needed anything outside itself would show it."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 2000, timeout: int = 120) -> None:
    """Write `png`, the first `width`x`height` pixels of `page` as headless Chromium renders it.

    Raises FileNotFoundError without a Chromium, RuntimeError when it writes no screenshot."""
    exe = browser()
    if exe is None:
        raise FileNotFoundError("no Chromium found (" + ", ".join(BROWSERS) + "); Debian: apt-get install chromium")
    png = Path(png).resolve()
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        res = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={width},{height}",
                              Path(page).resolve().as_uri()], capture_output=True, text=True, timeout=timeout)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"{exe} wrote no screenshot (exit {res.returncode}): {res.stderr.strip()[-500:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=2000)
    args = ap.parse_args()
    if not args.page.is_file():
        print(f"error: {args.page} does not exist", file=sys.stderr)
        return 5
    try:
        screenshot(args.page, args.png, args.width, args.height)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 9
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"screenshot written to {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
