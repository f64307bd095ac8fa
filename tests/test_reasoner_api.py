"""API reasoner against a real chat-completions HTTP server on 127.0.0.1 (ephemeral port)."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lens_core.reasoner import (
    ApiReasoner,
    ReasonerError,
    ReasonerSettings,
    RefinementCache,
    clean_answer,
    refine,
)

KEY = "sk-test-SECRET-0123456789abcdef"
KEY_ENV = "LENS_TEST_REASONER_KEY"


def ok_reply(text: str) -> tuple[int, dict, bytes]:
    body = {
        "id": "x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }
    return 200, {}, json.dumps(body).encode()


class ChatServer:
    """Answers POST /v1/chat/completions from a script of actions, one per request.

    An action is ``(status, headers, body)`` or ``("sleep", seconds, action)``; the last one repeats.
    """

    def __init__(self) -> None:
        self.script: list = [ok_reply("dense")]
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                index = min(len(outer.requests) - 1, len(outer.script) - 1)
                action = outer.script[index]
                if action[0] == "sleep":
                    time.sleep(action[1])
                    action = action[2]
                status, headers, payload = action
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ChatServer()
    yield s
    s.close()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def settings_for(server: ChatServer, **kw) -> ReasonerSettings:
    base = dict(
        mode="api",
        api_base_url=server.url,
        api_model="test-model",
        api_key_env=KEY_ENV,
        api_timeout_s=5.0,
        api_max_retries=2,
        api_backoff_s=0.01,
        seed=5,
        system_prompt="SYSTEM",
    )
    base.update(kw)
    return ReasonerSettings(**base)


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def assert_no_key(*texts: str) -> None:
    for t in texts:
        assert KEY not in t


def run(server, settings, sleeps=None, cache=None):
    backend = ApiReasoner(settings, sleep=sleeps if sleeps is not None else Sleeps())
    return refine(["a cat"], settings, backend, cache=RefinementCache() if cache is None else cache)


def test_success_request_shape(server, key_env):
    server.script = [ok_reply("  A fluffy ginger cat sits on a red rug.  ")]
    (out,) = run(server, settings_for(server, temperature=0.3, top_p=0.9, max_new_tokens=77))
    assert out.text == "A fluffy ginger cat sits on a red rug." and out.mode == "api" and not out.fell_back
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    assert req["headers"]["Content-Type"] == "application/json"
    body = req["body"]
    assert body["model"] == "test-model"
    assert body["messages"] == [{"role": "system", "content": "SYSTEM"}, {"role": "user", "content": "a cat"}]
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (0.3, 0.9, 77, 5)


def test_api_params_override_and_remove(server, key_env):
    s = settings_for(
        server, api_params={"max_tokens": None, "max_completion_tokens": 9, "reasoning_effort": "low"}
    )
    run(server, s)
    body = server.requests[0]["body"]
    assert (
        "max_tokens" not in body and body["max_completion_tokens"] == 9 and body["reasoning_effort"] == "low"
    )


def test_no_key_sends_no_authorization(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    run(server, settings_for(server))
    assert "Authorization" not in server.requests[0]["headers"]


def test_full_url_accepted(server, key_env):
    run(server, settings_for(server, api_base_url=server.url + "/chat/completions/"))
    assert server.requests[0]["path"] == "/v1/chat/completions"


def test_timeout_is_retried_then_reported(server, key_env):
    server.script = [("sleep", 1.0, ok_reply("late"))]
    s = settings_for(server, api_timeout_s=0.2, api_max_retries=1)
    sleeps = Sleeps()
    start = time.monotonic()
    with pytest.raises(ReasonerError, match=r"within 0.2 s \(timeout\).*2 attempt") as info:
        run(server, s, sleeps)
    assert time.monotonic() - start < 3.0
    assert len(server.requests) == 2 and sleeps == [0.01]
    assert_no_key(str(info.value))


def test_500_then_success(server, key_env):
    server.script = [
        (500, {}, b'{"error": {"message": "overloaded"}}'),
        (502, {}, b"bad gateway"),
        ok_reply("ok now"),
    ]
    sleeps = Sleeps()
    (out,) = run(server, settings_for(server, api_backoff_s=0.5), sleeps)
    assert out.text == "ok now" and len(server.requests) == 3
    assert sleeps == [0.5, 1.0]  # exponential backoff


def test_429_honours_retry_after(server, key_env):
    server.script = [(429, {"Retry-After": "3"}, b'{"error": {"message": "slow down"}}'), ok_reply("fine")]
    sleeps = Sleeps()
    (out,) = run(server, settings_for(server), sleeps)
    assert out.text == "fine" and sleeps == [3.0]


def test_500_always_fail_or_passthrough(server, key_env, caplog):
    server.script = [(500, {}, b'{"error": {"message": "internal"}}')]
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ReasonerError, match=r"HTTP 500.*internal.*3 attempt") as info:
        run(server, settings_for(server))
    assert len(server.requests) == 3
    server.requests.clear()
    (out,) = run(server, settings_for(server, on_error="passthrough"))
    assert out.fell_back and out.text == "a cat" and "HTTP 500" in out.warnings[0]
    text = "".join(traceback.format_exception(info.value))
    assert_no_key(str(info.value), repr(info.value), text, caplog.text, *out.warnings)


def test_client_errors_are_not_retried_and_key_is_redacted(server, key_env, caplog, capsys):
    # A server that echoes the key back (some do, partly) must not leak it through our messages.
    message = json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}"}}).encode()
    server.script = [(401, {}, message)]
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ReasonerError) as info:
        run(server, settings_for(server))
    assert len(server.requests) == 1
    msg = str(info.value)
    assert "HTTP 401" in msg and KEY_ENV in msg and "[redacted]" in msg
    captured = capsys.readouterr()
    assert_no_key(
        msg, "".join(traceback.format_exception(info.value)), caplog.text, captured.out, captured.err
    )


def test_malformed_json(server, key_env):
    server.script = [(200, {}, b"<html>not json</html>")]
    with pytest.raises(ReasonerError, match="not JSON"):
        run(server, settings_for(server))
    assert len(server.requests) == 1


@pytest.mark.parametrize("payload", [{"id": "x"}, {"choices": []}, {"choices": [{"message": {}}]}, [1, 2]])
def test_missing_choices(server, key_env, payload):
    server.script = [(200, {}, json.dumps(payload).encode())]
    with pytest.raises(ReasonerError, match=r"no choices\[0\]\.message\.content"):
        run(server, settings_for(server))
    (out,) = run(server, settings_for(server, on_error="passthrough"))
    assert out.fell_back and out.text == "a cat"


def test_empty_answer_falls_back(server, key_env):
    server.script = [ok_reply("   ")]
    (out,) = run(server, settings_for(server, on_error="passthrough"))
    assert out.fell_back and "no answer" in out.warnings[0]


def test_connection_refused(key_env):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ReasonerSettings(
        mode="api",
        api_base_url=f"http://127.0.0.1:{port}/v1",
        api_model="m",
        api_key_env=KEY_ENV,
        api_max_retries=1,
        api_backoff_s=0.0,
        system_prompt="S",
    )
    with pytest.raises(ReasonerError, match="cannot reach"):
        refine(["a cat"], settings, ApiReasoner(settings, sleep=Sleeps()), cache=RefinementCache())


def test_results_are_cached(server, key_env):
    cache = RefinementCache()
    s = settings_for(server)
    first = run(server, s, cache=cache)[0]
    second = run(server, s, cache=cache)[0]
    assert not first.cached and second.cached and second.text == first.text
    assert len(server.requests) == 1
    run(server, dataclasses.replace(s, temperature=0.1), cache=cache)
    run(server, dataclasses.replace(s, api_model="other"), cache=cache)
    assert len(server.requests) == 3
    # seed=None means fresh sampling every time: never served from the cache.
    run(server, dataclasses.replace(s, seed=None), cache=cache)
    run(server, dataclasses.replace(s, seed=None), cache=cache)
    assert len(server.requests) == 5


def test_settings_validation():
    with pytest.raises(ValueError, match="api_model"):
        ReasonerSettings(mode="api").validate()
    with pytest.raises(ValueError, match="NAME"):
        ReasonerSettings(mode="api", api_model="m", api_base_url="http://127.0.0.1:9/v1", api_key_env="sk-123 abc").validate()
    with pytest.raises(ValueError, match="needs api_base_url"):  # no default endpoint is ever contacted
        ReasonerSettings(mode="api", api_model="m").validate()
    with pytest.raises(ValueError, match="http"):
        ReasonerSettings(mode="api", api_model="m", api_base_url="localhost:8000/v1").validate()
    with pytest.raises(ValueError, match="on_error"):
        ReasonerSettings(on_error="ignore").validate()


def test_clean_answer():
    assert clean_answer('"A red cube."') == "A red cube."
    assert clean_answer("<think>plan</think>\nA red\ncube.") == "A red cube."
    assert clean_answer("```\nA red cube.\n```") == "A red cube."
    leaked = "<|channel|>analysis<|message|>plan<|end|><|start|>assistant<|channel|>final<|message|>A cube.<|return|>"
    assert clean_answer(leaked) == "A cube."
