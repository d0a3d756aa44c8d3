"""A real `coreml-sd serve` process for the tests: on 127.0.0.1, on a free port it picks and prints, its log kept
in a file for the tests to read."""
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SERVE = [sys.executable, "-c", "import sys; from coreml_sd.runtime.commandline import main; sys.exit(main())", "serve"]
START_TIMEOUT_S = 300  # imports and one model load on a busy 2-core machine
URL_LINE = re.compile(r"serving (http://\S+)")


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    @property
    def api(self) -> str:
        return f"{self.url}/sdapi/v1"

    def log_text(self) -> str:
        return self.log.read_text()

    def rss_kib(self) -> int:
        """The server process's resident memory (Linux's /proc)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(root: Path, log: Path, *args: str) -> Server:
    """`coreml-sd serve --port 0 ARGS` over the packages in `root`; returns once it prints where it listens."""
    env = {**os.environ, "COREML_SD_PACKAGES": str(root), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as log_file:
        process = subprocess.Popen([*SERVE, "--port", "0", *args], stdout=subprocess.PIPE, stderr=log_file, text=True,
                                   env=env)
    found: list[str] = []

    def read_url() -> None:
        for line in process.stdout:
            match = URL_LINE.search(line)
            if match:
                found.append(match.group(1))
                return

    reader = threading.Thread(target=read_url, daemon=True)
    reader.start()
    reader.join(START_TIMEOUT_S)
    if not found:
        process.kill()
        raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")
    return Server(found[0], process, log)


def red_share(image: Image.Image) -> float:
    """The share of clearly red pixels (a 64x64 demo circle of radius 13-22% covers 5-15% of the picture)."""
    rgb = np.asarray(image.convert("RGB")).astype(int)
    return float(np.mean((rgb[..., 0] > 150) & (rgb[..., 1] < 100) & (rgb[..., 2] < 100)))
