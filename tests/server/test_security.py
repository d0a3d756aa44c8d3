"""Who may reach the server: loopback unless told, a network host only behind --api-auth, HTTP basic auth as
A1111's, and a queue that refuses past its bound; each refusal is one line or one clean answer."""
import socket
import threading
import time

import httpx
import pytest

from coreml_sd.runtime.commandline import main

from server_testing import start_server

webuiapi = pytest.importorskip("webuiapi")
USER, PASSWORD = "alice", "correct horse"
FAST = {"steps": 2, "width": 128, "height": 128}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.org"])
def test_a_network_host_without_auth_refuses_to_start(host, capsys):
    assert main(["serve", "--host", host]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [(f"Error: --host {host} lets other machines generate here; add --api-auth "
                                         "USER:PASS, or leave --host out to serve this machine only (see coreml-sd "
                                         "serve --help)")]


def test_malformed_api_auth_is_one_line(capsys):
    assert main(["serve", "--api-auth", "alice"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "Error: --api-auth takes USER:PASS (several separated by commas), not 'alice' (see coreml-sd serve --help)"]


def test_a_port_in_use_is_one_line(packages_root, monkeypatch, capsys):
    monkeypatch.setenv("COREML_SD_PACKAGES", str(packages_root))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "tiny", "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"Error: cannot listen on 127.0.0.1:{port} (Address already in use); "
                   "choose another --port or --host"]


@pytest.fixture(scope="module")
def guarded(packages_root, tmp_path_factory):
    """A server behind basic auth that lets one request wait."""
    running = start_server(packages_root, tmp_path_factory.mktemp("guarded") / "server.log", "--model", "tiny",
                           "--api-auth", f"bob:builder,{USER}:{PASSWORD}", "--queue-size", "1")
    yield running
    running.stop()


@pytest.mark.parametrize("auth", [None, (USER, "wrong"), ("mallory", PASSWORD), (USER, "")],
                         ids=["missing", "wrong password", "unknown user", "empty password"])
@pytest.mark.parametrize("path", ["/sdapi/v1/sd-models", "/", "/docs"])
def test_every_route_needs_the_credentials(guarded, auth, path):
    response = httpx.get(guarded.url + path, auth=auth, timeout=30)
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Basic"
    assert "incorrect or missing username or password" in response.json()["detail"]


def test_the_right_credentials_generate(guarded):
    api = webuiapi.WebUIApi(baseurl=guarded.api, username=USER, password=PASSWORD)
    result = api.txt2img(prompt="a fox", seed=1, **FAST)
    assert len(result.images) == 1 and result.info["all_seeds"] == [1]
    assert httpx.get(guarded.url + "/", auth=("bob", "builder"), timeout=30).status_code == 200


def progress(server) -> dict:
    return httpx.get(server.api + "/progress", auth=(USER, PASSWORD), timeout=30).json()


def wait_for(server, condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition(progress(server)):
        assert time.monotonic() < deadline, progress(server)
        time.sleep(0.05)


def test_past_the_queue_size_is_503_with_retry_after(guarded):
    answers = {}

    def post(name: str, steps: int) -> None:
        answers[name] = httpx.post(guarded.api + "/txt2img", json={**FAST, "steps": steps, "seed": 5},
                                   auth=(USER, PASSWORD), timeout=120)

    running = threading.Thread(target=post, args=("running", 1000))
    running.start()
    wait_for(guarded, lambda p: p["state"]["job_count"] == 1)
    waiting = threading.Thread(target=post, args=("waiting", 2))
    waiting.start()
    wait_for(guarded, lambda p: p["state"]["queued"] == 1)
    post("refused", 2)
    refused = answers["refused"]
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
    assert "the queue is full (1 requests wait)" in refused.json()["detail"]
    httpx.post(guarded.api + "/interrupt", auth=(USER, PASSWORD), timeout=30)
    running.join(120)
    waiting.join(120)
    assert answers["running"].status_code == answers["waiting"].status_code == 200
    assert len(answers["waiting"].json()["images"]) == 1


def test_a_client_that_leaves_frees_the_worker(guarded):
    with pytest.raises(httpx.ReadTimeout):  # the client hangs up during a 1000-step generation
        httpx.post(guarded.api + "/txt2img", json={**FAST, "steps": 1000, "seed": 6}, auth=(USER, PASSWORD),
                   timeout=httpx.Timeout(30, read=2))
    wait_for(guarded, lambda p: p["state"]["job_count"] == 0, timeout_s=30)  # ~100 s of steps left when it left
    after = httpx.post(guarded.api + "/txt2img", json={**FAST, "seed": 6}, auth=(USER, PASSWORD), timeout=120)
    assert after.status_code == 200 and len(after.json()["images"]) == 1
    assert "Traceback" not in guarded.log_text()
