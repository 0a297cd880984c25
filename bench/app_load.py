"""Load test of the demo's /reconstruct endpoint: concurrent gradio_client clients all sending the same image
(byte-identical outputs: the case that cuts downloads short in gradio 6.31 unless the app makes them differ).

Launches ``app.py`` in a subprocess (its startup time is reported too) or targets a running app with --url::

    python bench/app_load.py                                            # shipped checkpoints, 8 clients x 25
    python bench/app_load.py --tokenizer /tmp/dev-assets/dualtoken-tiny --baseline /tmp/dev-assets/vilau-tiny
    python bench/app_load.py --url http://127.0.0.1:7860 --clients 4 --requests 10

While the load runs, a probe fetches the page config and calls /model_info every second: the app must stay
responsive to everyone else. Prints successes, p50/p95/max latency, throughput and the probe's latencies; exits 1
if any request failed.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = ROOT / "assets" / "examples" / "toy-red-checkered-circle.png"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_app(args) -> tuple[subprocess.Popen, str, float]:
    """Start app.py on a free port; return the process, its URL and the seconds until it answered."""
    import httpx

    port = free_port()
    cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--device", "cpu"]
    for flag in ("tokenizer", "baseline", "unified"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    log = open(args.app_log, "w") if args.app_log else subprocess.DEVNULL
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - start < args.startup_timeout:
        if proc.poll() is not None:
            sys.exit(f"app.py exited with status {proc.returncode} before serving (see --app-log)")
        try:
            if httpx.get(f"{url}/config", timeout=2).status_code == 200:
                return proc, url, time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.terminate()
    sys.exit(f"app.py did not answer within {args.startup_timeout} s")


def run_load(url: str, image: Path, clients: int, requests: int, depth: int | None) -> dict:
    from gradio_client import Client, handle_file

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    extra = [] if depth is None else [depth]

    def client_loop() -> None:
        try:
            client = Client(url, verbose=False)
        except Exception as e:  # noqa: BLE001  (counted: a client that cannot connect fails all its requests)
            with lock:
                errors.extend([f"connect: {e!r}"] * requests)
            return
        for _ in range(requests):
            start = time.perf_counter()
            try:
                dual, base, table, *_ = client.predict(handle_file(str(image)), *extra, api_name="/reconstruct")
                if not (Path(dual[1]).stat().st_size and len(table["data"]) >= 1):
                    raise RuntimeError("empty result")
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(repr(e)[:300])
                continue
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "errors": errors, "wall": time.perf_counter() - start}


class Probe(threading.Thread):
    """Fetches /config and calls /model_info once a second until stopped; records both latencies."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.page, self.info, self.failures = url, threading.Event(), [], [], 0

    def run(self) -> None:
        import httpx
        from gradio_client import Client

        client = Client(self.url, verbose=False)
        while not self.stop.is_set():
            try:
                t = time.perf_counter()
                httpx.get(f"{self.url}/config", timeout=30).raise_for_status()
                self.page.append(time.perf_counter() - t)
                t = time.perf_counter()
                client.predict(api_name="/model_info")
                self.info.append(time.perf_counter() - t)
            except Exception:  # noqa: BLE001
                self.failures += 1
            self.stop.wait(1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running app to load (default: launch app.py in a subprocess)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent gradio_client clients")
    parser.add_argument("--requests", type=int, default=25, help="reconstruction requests per client")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="the image every request sends")
    parser.add_argument("--depth", type=int, default=None, help="RVQ depths to decode (default: the app's default)")
    parser.add_argument("--tokenizer", help="--tokenizer for the launched app (default: the shipped checkpoint)")
    parser.add_argument("--baseline", help="--baseline for the launched app")
    parser.add_argument("--unified", help="--unified for the launched app")
    parser.add_argument("--app-log", help="file for the launched app's output (default: discarded)")
    parser.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for the app")
    args = parser.parse_args(argv)
    if not args.image.is_file():
        sys.exit(f"no image at {args.image} (python -m app.make_examples writes the examples)")

    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        proc, url, startup = launch_app(args)
        print(f"app.py answered after {startup:.1f} s ({url})")
    try:
        from gradio_client import Client, handle_file

        Client(url, verbose=False).predict(handle_file(str(args.image)), api_name="/reconstruct")  # warm-up
        probe = Probe(url)
        probe.start()
        result = run_load(url, args.image, args.clients, args.requests, args.depth)
        probe.stop.set()
        probe.join()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)

    lat, errors, total = result["latencies"], result["errors"], args.clients * args.requests
    print(f"clients {args.clients} x requests {args.requests} = {total}, image {args.image.name}, "
          f"{os.cpu_count()} CPUs")
    print(f"success {len(lat)}/{total}, failures {len(errors)}")
    if lat:
        print(f"latency p50 {statistics.median(lat):.2f} s, p95 {percentile(lat, 95):.2f} s, max {max(lat):.2f} s; "
              f"throughput {len(lat) / result['wall']:.2f} req/s over {result['wall']:.1f} s")
    for name, values in (("page config", probe.page), ("/model_info", probe.info)):
        if values:
            print(f"probe {name}: {len(values)} calls, p50 {statistics.median(values):.3f} s, "
                  f"max {max(values):.3f} s")
    print(f"probe failures {probe.failures}")
    for error in sorted(set(errors))[:5]:
        print(f"  error: {error}")
    if errors or probe.failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
