"""`coreml-sd serve` under load, printed as JSON: CLIENTS clients send REQUESTS txt2img requests each, one after
the other, while another polls /progress.

Every answer is checked: an image whose PNG parameters carry the request's own prompt and seed (none lost, none
duplicated, none another's), or a 503 with Retry-After when the queue is full. Targets: /progress answers in
under 100 ms (median) during the load, and the server's memory after the run is within 10% of its memory after
the first request.

    coreml-sd serve --model tiny --queue-size 8 &
    python scripts/bench_server.py --url http://127.0.0.1:7860 --pid $!
"""
import argparse
import base64
import io
import json
import statistics
import subprocess
import threading
import time

import httpx
from PIL import Image

TARGET_PROGRESS_MS = 100
TARGET_RSS_GROWTH = 0.10
PROGRESS_INTERVAL_S = 0.02


def rss_kib(pid: int) -> int:
    return int(subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True,
                              check=True).stdout)


def problem(response: httpx.Response, prompt: str, seed: int) -> str | None:
    """What is wrong with one answer, or None."""
    if response.status_code == 503:
        if int(response.headers.get("Retry-After", "0")) <= 0:
            return f"{prompt}: a 503 without Retry-After"
        return None
    if response.status_code != 200:
        return f"{prompt}: {response.status_code} {response.text[:200]}"
    answer = response.json()
    if len(answer["images"]) != 1:
        return f"{prompt}: {len(answer['images'])} images"
    with Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))) as image:
        parameters = image.info.get("parameters", "")
    if not parameters.startswith(prompt + "\n") or f"Seed: {seed}," not in parameters:
        return f"{prompt} (seed {seed}) got an image of {parameters!r}"
    return None


def run(url: str, pid: int, clients: int, requests: int, steps: int, size: int | None) -> dict:
    api = f"{url}/sdapi/v1"
    body = {"steps": steps, "width": size, "height": size, "sampler_name": "DDIM"}
    first = httpx.post(f"{api}/txt2img", json={**body, "prompt": "warm-up", "seed": 1}, timeout=600)
    first.raise_for_status()
    rss_first = rss_kib(pid)
    answers: dict[tuple[int, int], httpx.Response] = {}
    latencies: list[float] = []
    done = threading.Event()

    def client(number: int) -> None:
        with httpx.Client(timeout=600) as http:
            for index in range(requests):
                prompt, seed = f"client {number} request {index}", 1000 + 100 * number + index
                answers[number, index] = http.post(f"{api}/txt2img", json={**body, "prompt": prompt, "seed": seed})

    def poll_progress() -> None:
        with httpx.Client(timeout=60) as http:
            while not done.is_set():
                start = time.perf_counter()
                http.get(f"{api}/progress").raise_for_status()
                latencies.append((time.perf_counter() - start) * 1000)
                time.sleep(PROGRESS_INTERVAL_S)

    poller = threading.Thread(target=poll_progress)
    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    started = time.perf_counter()
    poller.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    poller.join()
    elapsed = time.perf_counter() - started
    rss_after = rss_kib(pid)
    problems = [f"client {c} request {r}: no answer" for c in range(clients) for r in range(requests)
                if (c, r) not in answers]
    problems += [issue for (c, r), response in sorted(answers.items())
                 if (issue := problem(response, f"client {c} request {r}", 1000 + 100 * c + r))]
    statuses = [response.status_code for response in answers.values()]
    median = statistics.median(latencies)
    return {
        "clients": clients, "requests_per_client": requests, "steps": steps, "seconds": round(elapsed, 1),
        "images": statuses.count(200), "queue_full_503": statuses.count(503), "problems": problems,
        "progress_polls": len(latencies), "progress_median_ms": round(median, 1),
        "progress_p95_ms": round(statistics.quantiles(latencies, n=20)[-1], 1),
        "progress_max_ms": round(max(latencies), 1),
        "progress_target_ms": TARGET_PROGRESS_MS, "progress_meets_target": median < TARGET_PROGRESS_MS,
        "rss_after_first_request_mib": round(rss_first / 1024, 1), "rss_after_load_mib": round(rss_after / 1024, 1),
        "rss_growth": round(rss_after / rss_first - 1, 3),
        "rss_meets_target": rss_after <= rss_first * (1 + TARGET_RSS_GROWTH),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:7860")
    parser.add_argument("--pid", type=int, required=True, help="the server's process id, for its memory")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="per client, one after the other")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, help="width and height (default: the package's)")
    options = parser.parse_args()
    print(json.dumps(run(options.url, options.pid, options.clients, options.requests, options.steps, options.size),
                     indent=2))


if __name__ == "__main__":
    main()
