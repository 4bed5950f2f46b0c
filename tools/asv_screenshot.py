"""Publish the asv report and screenshot it in headless Chromium, as a person would see it.

    python tools/asv_screenshot.py                  # asv publish, then the summary grid
    python tools/asv_screenshot.py --bench bench_softmax.Softmax.time_softmax --no-publish

asv's pages load their JSON with XHR, which browsers refuse over file://, so the report
is served by ``python -m http.server`` on 127.0.0.1 for the duration. They also load
jQuery, flot and Bootstrap from public CDNs; unless ``--online`` is given, the report is
served from a copy whose CDN tags point at the same libraries fetched once with
``npm pack`` (cached in .asv/vendor), so the screenshot needs no access to those CDNs.
Chromium is Debian's ``chromium`` package (``apt-get install -y chromium``). The PNG
paths are printed; a PNG too small to hold more than a blank page fails the script.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / ".asv" / "html"
VENDOR = ROOT / ".asv" / "vendor"
# cdnjs library names that differ from their npm package names.
CDNJS_TO_NPM = {"stupidtable": "stupid-table-plugin"}
CDN_TAG = re.compile(r'<(script|link)\b[^>]*?(?:src|href)="(https://[^"]+)"[^>]*>')
BLANK_BYTES = 20_000
DEFAULT_BENCH = "bench_softmax.Softmax.time_softmax"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--window-size=1400,1000", "--virtual-time-budget=10000",
]


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no Chromium found: apt-get update && apt-get install -y chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(directory: Path) -> tuple[subprocess.Popen, str]:
    """Serve ``directory`` on 127.0.0.1; return the server process and its base URL once it answers."""
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
               "--directory", str(directory)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/"
    for _ in range(100):
        try:
            urllib.request.urlopen(base + "index.html", timeout=1).close()
            return server, base
        except OSError:
            time.sleep(0.1)
    server.terminate()
    sys.exit(f"http.server did not answer on {base}")


def screenshot(chromium: str, url: str, png: Path) -> None:
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="asv-chromium-") as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}", url]
        result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    if not png.exists():
        sys.exit(f"Chromium wrote no screenshot for {url}:\n{result.stderr[-2000:]}")


# ------------------------------------------------------------- offline report copy ----
def npm_source(url: str) -> tuple[str, str, str]:
    """(npm package, version, path inside it) for a CDN URL asv's pages use."""
    if m := re.fullmatch(r"https://code\.jquery\.com/jquery-([\d.]+)\.min\.js", url):
        return "jquery", m[1], "dist/jquery.min.js"
    if m := re.fullmatch(r"https://cdn\.jsdelivr\.net/npm/((?:@[^/]+/)?[^@/]+)@([^/]+)/(.+)", url):
        return m[1], m[2], m[3]
    if m := re.fullmatch(r"https://cdnjs\.cloudflare\.com/ajax/libs/([^/]+)/([^/]+)/(.+)", url):
        return CDNJS_TO_NPM.get(m[1], m[1]), m[2], m[3]
    raise ValueError(f"no npm source known for {url}")


def npm_tarball(package: str, version: str) -> Path:
    """The package's tarball from the npm registry (``npm pack``), cached in .asv/vendor."""
    VENDOR.mkdir(parents=True, exist_ok=True)
    for spec in (f"{package}@{version}", package):  # a version npm lacks: its latest
        stem = spec.replace("@", "-").replace("/", "-").lstrip("-")
        cached = sorted(VENDOR.glob(f"{stem}*.tgz")) if spec != package else []
        if cached:
            return cached[0]
        result = subprocess.run(["npm", "pack", "--silent", "--pack-destination", str(VENDOR), spec],
                                check=False, capture_output=True, text=True)
        if result.returncode == 0:
            return VENDOR / result.stdout.split()[-1]
    sys.exit(f"npm pack {package} failed:\n{result.stderr[-1000:]}")


def extract(tarball: Path, path: str) -> bytes:
    """``path`` from an npm tarball, else the file of the same name, minified or not."""
    with tarfile.open(tarball) as tar:
        names = [n for n in tar.getnames() if n.startswith("package/")]
        base = path.rsplit("/", 1)[-1]
        wanted = [f"package/{path}"] + [n for n in names if n.endswith("/" + base)] + [
            n for n in names if n.endswith("/" + base.replace(".min.", "."))]
        for name in wanted:
            if name in names:
                return tar.extractfile(name).read()
    sys.exit(f"{path} not found in {tarball.name}")


def offline_copy(html: Path, into: Path) -> Path:
    """A copy of the report whose CDN scripts and styles are local files."""
    shutil.copytree(html, into, dirs_exist_ok=True)
    (into / "vendor").mkdir(exist_ok=True)
    for page in into.glob("*.html"):
        text = page.read_text()

        def local(match: re.Match) -> str:
            tag, url = match[0], match[2]
            package, version, path = npm_source(url)
            name = f"{package.replace('/', '-')}-{path.rsplit('/', 1)[-1]}"
            (into / "vendor" / name).write_bytes(extract(npm_tarball(package, version), path))
            tag = re.sub(r'\s(integrity|crossorigin|referrerpolicy)="[^"]*"', "", tag)
            return tag.replace(url, f"vendor/{name}")

        page.write_text(CDN_TAG.sub(local, text))
    return into


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-publish", action="store_true", help="screenshot the report as it is")
    parser.add_argument("--bench", action="append",
                        help=f"also screenshot this benchmark's graph page (default {DEFAULT_BENCH})")
    parser.add_argument("--online", action="store_true",
                        help="let the pages load their libraries from the CDNs")
    parser.add_argument("--out", type=Path, default=ROOT / ".asv" / "screenshots",
                        help="directory for the PNGs")
    args = parser.parse_args(argv)

    if not args.no_publish:
        subprocess.run([sys.executable, "-m", "asv", "publish"], cwd=ROOT, check=True)
    if not (HTML / "index.html").exists():
        sys.exit(f"no report in {HTML}: run `asv run` and `asv publish` first")
    chromium = find_chromium()
    pages = {"index": ""} | {bench: f"#{bench}" for bench in (args.bench or [DEFAULT_BENCH])}
    workdir = tempfile.TemporaryDirectory(prefix="asv-html-")
    served = HTML if args.online else offline_copy(HTML, Path(workdir.name) / "html")
    server, base = serve(served)
    try:
        shots = []
        for name, fragment in pages.items():
            png = args.out / f"{name}.png"
            screenshot(chromium, f"{base}index.html{fragment}", png)
            shots.append(png)
    finally:
        server.terminate()
        server.wait(timeout=10)
        workdir.cleanup()
    blank = False
    for png in shots:
        size = png.stat().st_size
        print(f"{png}  ({size} bytes)")
        # A blank 1400x1000 page compresses to a few kB; text and graphs take far more.
        if size < BLANK_BYTES:
            print(f"  {png} looks blank (< {BLANK_BYTES} bytes)", file=sys.stderr)
            blank = True
    return 1 if blank else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
