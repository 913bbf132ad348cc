"""The caller's mistakes in ``williw serve-api`` and ``williw generate`` (issue 29): each is a 400 in OpenAI's error
shape (streamed or not) or, in the CLI, one line ``error: ...`` and exit 2; the server's stderr never shows a
traceback; a generation asked for more tokens than the context leaves stops there with finish reason ``length``
and keeps its text, token for token what ``model.generate`` of the whole model makes.

One fleet for the module, real processes on loopback: a worker, a node agent (a tiny 4-block Llama with a
byte-level tokenizer and no chat template, so a byte is a token; one stage: the KV budget it checks is the same on
every stage of a longer chain, and each more node process costs seconds of imports), a context of 40 tokens, and
``williw serve-api`` with its stderr in a file. Where a test needs a generator of its own (a strict chat template,
a failing node) the app runs in this process on a uvicorn thread.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from williw import tinymodels  # noqa: E402
from williw.client import WorkerClient  # noqa: E402
from williw.errors import GenerateError  # noqa: E402
from williw.generation import Generator  # noqa: E402
from williw.metadata import generate_metadata  # noqa: E402
from williw.openai_api import create_app  # noqa: E402
from williw.serve import ModelServer  # noqa: E402
from workerproc import VENV_BIN, WorkerProcess, free_port, stop_processes, wait_for  # noqa: E402

MODEL = "t/tiny-errors"
CONTEXT = 40  # the request's sequence_length: every stage's KV budget per session
EOS = 256
PROMPT = "Twenty-four bytes long. "  # 24 byte tokens: the context leaves 40 - 24 + 1 = 17 new ones
STRICT_TEMPLATE = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                   "{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}"
                   "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: "
                   "{% endif %}")


def _tokenizer(chat_template: str | None = None) -> Any:
    """A byte-level tokenizer (256 byte tokens, no merges) and ``</s>`` = 256, as in test_generate.py."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["</s>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", chat_template=chat_template)


class Fleet:
    def __init__(self, model: Path, worker: str, rid: str, api: str, api_log: Path) -> None:
        self.model, self.worker, self.rid, self.api, self.api_log = model, worker, rid, api, api_log
        self._ref: Any = None

    def reference(self, prompt: str, n: int) -> list[int]:
        """``model.generate`` of the whole model: ``n`` greedy tokens after ``prompt``."""
        if self._ref is None:
            self._ref = transformers.AutoModelForCausalLM.from_pretrained(self.model, dtype=torch.float32).eval()
        ids = _tokenizer()(prompt, return_tensors="pt")["input_ids"]
        out = self._ref.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
        return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("generate-errors")
    model = tinymodels.build_causal_lm(tmp / "model", "llama", vocab_size=260, eos_token_id=EOS, bos_token_id=None)
    _tokenizer().save_pretrained(model)
    worker = WorkerProcess(f"sqlite:///{tmp / 'worker.db'}", node_ttl=5.0, log_path=tmp / "worker.log").start()
    server = ModelServer(model).start()
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(
            [str(VENV_BIN / "williw"), "node", "--worker", worker.url, "--node-id", "node-a", "--compute-tflops", "1",
             "--memory-gb", "0.02", "--data-dir", str(tmp / "node-a"), "--heartbeat-s", "0.3", "--poll-s", "0.1"],
            stdout=open(tmp / "node-a.log", "w"), stderr=subprocess.STDOUT))  # noqa: SIM115
        with WorkerClient(worker.url) as c:
            wait_for("the node online", lambda: len(c.list_nodes(online=True)) == 1)
            rid = c.create_request(MODEL, batch_size=1, sequence_length=CONTEXT)["request_id"]
            c.process(rid, metadata=generate_metadata(model, model_name=MODEL).to_dict())
            c.distribute(rid, server.url)
            wait_for("shards ready", lambda: all(a["state"] == "ready"
                                                 for a in c.request_assignments(rid)["assignments"]))
            port = free_port()
            api_log = tmp / "serve-api.stderr"
            procs.append(subprocess.Popen(
                [str(VENV_BIN / "williw"), "serve-api", "--worker", worker.url, "--request", rid, "--port",
                 str(port)], stdout=subprocess.DEVNULL, stderr=open(api_log, "w")))  # noqa: SIM115
            api = f"http://127.0.0.1:{port}/v1"
            wait_for("stages loaded", lambda: all(
                httpx.get(f"{r['serve_url']}/stage/{rid}/v1").json()["state"] == "loaded"
                for r in c.request_assignments(rid)["assignments"]), 120)
            wait_for("serve-api listening", lambda: _listening(api), 60)
        yield Fleet(model, worker.url, rid, api, api_log)
    finally:
        stop_processes(procs)
        server.shutdown()
        worker.stop()


def _listening(api: str) -> bool:
    try:
        return httpx.get(f"{api}/models").status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def api(fleet: Fleet) -> Iterator[str]:
    """serve-api's URL; what the test made it write on its stderr must hold no traceback."""
    before = fleet.api_log.stat().st_size
    yield fleet.api
    with open(fleet.api_log) as f:
        f.seek(before)
        log = f.read()
    assert "Traceback" not in log and "Exception" not in log, log


@contextlib.contextmanager
def _serving(generator: Generator) -> Iterator[str]:
    """The app over ``generator`` on a uvicorn thread; on leaving, its log must hold no traceback."""
    import uvicorn

    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("uvicorn").addHandler(handler)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(generator, MODEL), host="127.0.0.1", port=port,
                                           log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for("uvicorn started", lambda: server.started, 30, 0.02)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)
        logging.getLogger("uvicorn").removeHandler(handler)
    assert "Traceback" not in log.getvalue(), log.getvalue()


def _post(api: str, path: str, body: dict[str, Any] | str) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{api}/{path}", content=content, headers={"content-type": "application/json"}, timeout=60)


def _error(param: str | None, code: str | None, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def _events(r: httpx.Response) -> list[Any]:
    assert r.text.endswith("data: [DONE]\n\n"), r.text
    return [json.loads(line[6:]) for line in r.text.split("\n\n")[:-2]]


CHAT = "chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("path", "body", "param", "code", "message"), [
    # Python's json reads NaN; FastAPI's 422 then could not encode its own answer: a bare 500
    ("completions", '{"prompt": "a", "temperature": NaN}', "temperature", "invalid_value",
     "invalid 'temperature': input should be a finite number"),
    ("completions", {"prompt": "a", "seed": 2**64}, "seed", "invalid_value",
     "invalid 'seed': input should be less than or equal to 18446744073709551615"),
    ("completions", {"prompt": "a", "seed": -(2**63) - 1}, "seed", "invalid_value",
     "invalid 'seed': input should be greater than or equal to -9223372036854775808"),
    ("completions", {"prompt": "a", "temperature": 2.5}, "temperature", "invalid_value",
     "invalid 'temperature': input should be less than or equal to 2"),
    ("completions", {"prompt": "a", "max_tokens": 0}, "max_tokens", "invalid_value",
     "invalid 'max_tokens': input should be greater than or equal to 1"),
    ("completions", {"max_tokens": 4}, "prompt", "missing_required_parameter", "'prompt' is required"),
    (CHAT, {"messages": []}, "messages", "invalid_value",
     "invalid 'messages': list should have at least 1 item after validation, not 0"),
    (CHAT, {"messages": [{"role": 1, "content": "hi"}]}, "messages.[0].role", "invalid_type",
     "invalid 'messages.[0].role': input should be a valid string"),
    # a lone surrogate cannot be UTF-8: the tokenizer failed with a TypeError, a bare 500
    ("completions", {"prompt": "ab\ud800"}, "prompt", "invalid_value",
     "'prompt' is not valid Unicode: a lone surrogate '\\ud800' at character 2 (surrogates not allowed in UTF-8)"),
    (CHAT, {"messages": [{"role": "user", "content": "\udfff"}]}, "messages.[0].content", "invalid_value",
     "'messages.[0].content' is not valid Unicode: a lone surrogate '\\udfff' at character 0 (surrogates not "
     "allowed in UTF-8)"),
    # the nodes refused these (a 502 node_error); the context is the request's sequence_length
    ("completions", {"prompt": ""}, "prompt", "invalid_value", "the prompt gives no tokens: send at least one "
                                                               "character"),
    ("completions", {"prompt": "x" * (CONTEXT + 1)}, "prompt", "context_length_exceeded",
     "the prompt has 41 tokens, over the context of 40 tokens (the request's sequence_length); shorten it"),
    # the model has no chat template: a 500 and a traceback on the server's terminal
    (CHAT, {"messages": USER}, "messages", "invalid_value",
     f"the model's tokenizer has no chat template: '{MODEL}' can only complete a plain prompt (/v1/completions, "
     "or williw generate without --chat)"),
])
def test_a_callers_mistake_is_a_400_in_openais_shape(api: str, path: str, body: dict[str, Any] | str,
                                                     param: str | None, code: str | None, message: str,
                                                     stream: bool) -> None:
    if stream:
        body = body.replace("{", '{"stream": true, ', 1) if isinstance(body, str) else {**body, "stream": True}
    r = _post(api, path, body)
    assert (r.status_code, r.headers["content-type"], r.json()) == (400, "application/json",
                                                                    _error(param, code, message))


def test_a_body_that_is_not_json_is_a_400(api: str) -> None:
    r = _post(api, "completions", '{"prompt": "a",')
    assert (r.status_code, r.json()) == (400, _error(None, None, "the body is not valid JSON: Expecting property name "
                                                     "enclosed in double quotes at character 15"))


def test_a_chat_template_that_refuses_a_role_is_a_400(fleet: Fleet) -> None:
    """The template's raise_exception() (jinja's TemplateError) is the caller's mistake; a role it knows still
    generates."""
    gen = Generator(fleet.worker, fleet.rid, tokenizer=_tokenizer(STRICT_TEMPLATE))
    with _serving(gen) as url:
        for stream in (False, True):
            r = _post(url, CHAT, {"messages": [{"role": "wizard", "content": "hi"}], "stream": stream})
            assert (r.status_code, r.json()) == (400, _error("messages", "invalid_value", f"the chat template of "
                                                             f"'{MODEL}' refused the messages: Unknown role: wizard"))
        ok = _post(url, CHAT, {"messages": USER, "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_a_node_failure_after_the_status_line_is_an_error_event(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """Streamed, a failure once the 200 is sent comes as ``data: {"error": ...}`` then ``[DONE]``; not streamed it
    is a 502 in the same shape."""
    gen = Generator(fleet.worker, fleet.rid, tokenizer=_tokenizer())  # the tokenizer would ask a node too
    line = "node 'node-b' (http://127.0.0.1:9) did not answer: [Errno 111] Connection refused"

    def dead() -> None:
        raise GenerateError(line)

    monkeypatch.setattr(gen, "pipeline", dead)
    want = {"error": {"message": line, "type": "node_error", "param": None, "code": None}}
    with _serving(gen) as url:
        r = _post(url, "completions", {"prompt": "a", "stream": True})
        assert (r.status_code, _events(r)) == (200, [want])
        r = _post(url, "completions", {"prompt": "a"})
        assert (r.status_code, r.json()) == (502, want)


def test_max_tokens_beyond_the_context_stops_there_with_length(api: str, fleet: Fleet) -> None:
    """A prompt of P tokens leaves CONTEXT - P + 1 new ones (the last is never fed back to the stages); asked for
    64, the API answers those, finish reason ``length``, streamed or not. A prompt of exactly CONTEXT tokens
    still gets one."""
    n = CONTEXT - len(PROMPT) + 1
    want = fleet.reference(PROMPT, n)
    assert len(want) == n and EOS not in want
    text = _tokenizer().decode(want, skip_special_tokens=True)
    r = _post(api, "completions", {"prompt": PROMPT, "max_tokens": 64})
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["choices"][0]["text"], got["choices"][0]["finish_reason"]) == (text, "length")
    assert got["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": n, "total_tokens": CONTEXT + 1}
    events = _events(_post(api, "completions", {"prompt": PROMPT, "max_tokens": 64, "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events) == text
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == "length"

    full = _post(api, "completions", {"prompt": "x" * CONTEXT, "max_tokens": 64}).json()
    assert (full["usage"]["completion_tokens"], full["choices"][0]["finish_reason"]) == (1, "length")


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``williw ARGS`` in this process through the CLI's own error table (`run_main`): exit code, stdout, stderr."""
    from williw.cli import main

    monkeypatch.setattr(sys, "argv", ["williw", *args])
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")  # run_main sets it when unset
    code = 0
    with warnings.catch_warnings():  # run_main turns warnings off for the process
        try:
            main()
        except SystemExit as exc:
            code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_stops_at_the_context_and_prints_the_text_so_far(fleet: Fleet, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    n = CONTEXT - len(PROMPT) + 1
    code, out, err = _cli(monkeypatch, capsys, "generate", "--worker", fleet.worker, "--request", fleet.rid, PROMPT,
                          "--max-new-tokens", "64", "--json")
    assert code == 0, err
    got = json.loads(out)
    want = fleet.reference(PROMPT, n)
    assert (got["token_ids"], got["finish_reason"]) == (want, "length")
    assert got["text"] == _tokenizer().decode(want, skip_special_tokens=True)

    code, _, err = _cli(monkeypatch, capsys, "generate", "--worker", fleet.worker, "--request", fleet.rid, PROMPT,
                        "--max-new-tokens", "64")
    assert code == 0 and err.endswith(f"; stopped at the context of {CONTEXT} tokens (the request's "
                                      "sequence_length)\n"), err


@pytest.mark.parametrize(("args", "line"), [
    (["--chat", "hi"], f"error: the model's tokenizer has no chat template: '{MODEL}' can only complete a plain "
                       "prompt (/v1/completions, or williw generate without --chat)"),
    (["x" * (CONTEXT + 1)], "error: the prompt has 41 tokens, over the context of 40 tokens (the request's "
                            "sequence_length); shorten it"),
    (["hi", "--temperature", "nan"], "error: temperature is nan; give a number from 0 (greedy) up"),
    (["hi", "--seed", str(2**64)], "error: williw generate: Invalid value for '--seed': 18446744073709551616 is not "
                                   "in the range -9223372036854775808<=x<=18446744073709551615 (see 'williw "
                                   "generate --help')"),
])
def test_cli_answers_a_callers_mistake_in_one_line(fleet: Fleet, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str], args: list[str],
                                                   line: str) -> None:
    code, out, err = _cli(monkeypatch, capsys, "generate", "--worker", fleet.worker, "--request", fleet.rid, *args)
    assert (code, out, err) == (2, "", line + "\n")


@pytest.mark.parametrize("when", ["before reading", "after the first chunk"])
def test_a_streaming_client_that_hangs_up_frees_the_pipeline_and_its_sessions(fleet: Fleet, api: str,
                                                                              when: str) -> None:
    """The lock and the stages' session of a stream whose client leaves are freed at once: the next request (the
    KV budget is one session) is answered, where it used to wait 600 s for the lock, and the CLI's generation
    found the node's only session taken for 300 s."""
    import socket
    import time

    host, port = api.split("//")[1].split("/")[0].split(":")
    body = json.dumps({"prompt": "The placed model", "max_tokens": 30, "stream": True})
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        if when == "after the first chunk":
            got = b""
            while b"data: " not in got:
                got += sock.recv(4096)
    began = time.monotonic()
    r = _post(api, "completions", {"prompt": "The placed model", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert time.monotonic() - began < 10
    out = subprocess.run([str(VENV_BIN / "williw"), "generate", "--worker", fleet.worker, "--request", fleet.rid,
                          "hi", "--max-new-tokens", "2", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("temperature", [1e-40, 5e-324])
def test_a_tiny_temperature_samples_the_top_token(api: str, temperature: float) -> None:
    """``logits / T`` overflowed to inf and softmax gave NaN: a 500 and a traceback. From the largest logit it is
    the same distribution, all its mass on the top token: greedy's answer."""
    greedy = _post(api, "completions", {"prompt": "The placed model", "max_tokens": 6})
    tiny = _post(api, "completions", {"prompt": "The placed model", "max_tokens": 6, "temperature": temperature,
                                      "seed": 1})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_a_chat_template_that_fails_in_python_is_a_400(fleet: Fleet) -> None:
    template = "{% for m in messages %}{{ 1 / 0 if m['role'] == 'zero' else m['content'] }}{% endfor %}"
    generator = Generator(fleet.worker, fleet.rid, tokenizer=_tokenizer(template))
    with _serving(generator) as url:
        r = _post(url, CHAT, {"messages": [{"role": "zero", "content": "hi"}]})
    assert (r.status_code, r.json()) == (400, _error(
        "messages", "invalid_value", "the chat template of 't/tiny-errors' failed on the messages: "
        "ZeroDivisionError: division by zero"))
