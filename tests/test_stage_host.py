"""`williw.runtime.StageHost`, in-process, on the two stages of a tiny Llama built from their own shards: each
session keeps its own KV cache (its steps give the whole model's logits), the plan's KV budget refuses a session
beyond the batch size and a token beyond the sequence length in one line each, an idle session expires after
``ttl_s``, and closing a session frees it."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fleetproc import WholeSession, build_model, load_whole, pipeline_plan, write_shard  # noqa: E402
from williw.errors import GenerateError  # noqa: E402
from williw.runtime import StageHost, load_host  # noqa: E402

PROMPTS = (list(b"Each session keeps its own cache"), list(b"and nobody else's"))
FIRST = "node 'node-0' (blocks [0, 2))"


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[StageHost], Any]:
    """The two stages (blocks [0, 2) and [2, 4)) loaded from their shards, and the whole model."""
    root = tmp_path_factory.mktemp("stage-host")
    model = build_model(root / "model", layers=4)
    plan = pipeline_plan(model, [2], ["node-0", "node-1"])
    hosts = [load_host(write_shard(model, a.tensor_names, root / a.node_id), a.blocks,
                       f"node '{a.node_id}' (blocks [{a.blocks[0]}, {a.blocks[1]}))", max_sessions=1, max_tokens=1)
             for a in plan.assignments]
    return hosts, load_whole(model)


def host(stages: tuple[list[StageHost], Any], i: int = 0, *, sessions: int = 1, tokens: int = 64,
         ttl_s: float = 300.0) -> StageHost:
    """A fresh host of stage ``i`` (the loaded stage, no sessions) with this KV budget."""
    built = stages[0][i]
    return StageHost(built.stage, built.config, built.where, max_sessions=sessions, max_tokens=tokens, ttl_s=ttl_s)


def ids(tokens: list[int]) -> torch.Tensor:
    return torch.tensor([tokens], dtype=torch.long)


def refused(step, message: str) -> None:
    with pytest.raises(GenerateError) as exc:
        step()
    assert str(exc.value) == message


def test_each_session_keeps_its_own_cache(stages: tuple[list[StageHost], Any]) -> None:
    """Two sessions, stepped in turn through both stages: every step's logits are the whole model's for that
    session's own tokens, bit for bit (`WholeSession`)."""
    first, last = host(stages, 0, sessions=2), host(stages, 1, sessions=2)
    sids = [uuid.uuid4().hex for _ in PROMPTS]
    wholes = [WholeSession(stages[1]) for _ in PROMPTS]
    x = [ids(p) for p in PROMPTS]
    start = [0, 0]
    for _step in range(6):
        for i in range(len(PROMPTS)):
            got = last.forward(sids[i], first.forward(sids[i], x[i], start[i])["hidden"], start[i])["logits"]
            assert torch.equal(got, wholes[i].step(x[i][0].tolist())), f"session {i}, position {start[i]}"
            start[i] += x[i].shape[1]
            x[i] = ids([int(got.argmax())])
    assert [first.sessions[s].tokens for s in sids] == [last.sessions[s].tokens for s in sids] == start


def test_a_session_beyond_the_batch_size_is_refused_in_one_line(stages: tuple[list[StageHost], Any]) -> None:
    h = host(stages, sessions=2)
    a, b, c = (uuid.uuid4().hex for _ in range(3))
    h.forward(a, ids(PROMPTS[0]), 0)
    h.forward(b, ids(PROMPTS[1]), 0)
    refused(lambda: h.forward(c, ids(PROMPTS[0]), 0),
            f"{FIRST}: 2 sessions are open, the plan's KV budget is 2 (the request's batch_size); close one or wait "
            f"300 s for an idle one to expire")
    assert set(h.sessions) == {a, b}
    h.forward(a, ids(PROMPTS[1]), 0)  # an open session may start again: it takes no second place
    assert h.close(b)
    h.forward(c, ids(PROMPTS[0]), 0)
    assert set(h.sessions) == {a, c}


def test_a_token_beyond_the_sequence_length_is_refused_in_one_line(stages: tuple[list[StageHost], Any]) -> None:
    """A budget of 16 tokens: a 17-token prefill is refused; 12 tokens, then one at a time up to 16, run; a step
    that would go past 16 is refused and leaves the session as it was (the next good step gives the whole
    model's logits)."""
    first, last = host(stages, 0, tokens=16), host(stages, 1, tokens=16)
    sid = uuid.uuid4().hex
    prompt = PROMPTS[0][:12]
    refused(lambda: first.forward(sid, ids(PROMPTS[0][:17]), 0),
            f"{FIRST}: session {sid[:8]} would hold 17 tokens, over the plan's KV budget of 16 tokens (the "
            f"request's sequence_length)")
    assert first.sessions == {}
    last.forward(sid, first.forward(sid, ids(prompt[:10]), 0)["hidden"], 0)
    refused(lambda: first.forward(sid, ids(prompt[10:12] + [65, 66, 67, 68, 69]), 10),
            f"{FIRST}: session {sid[:8]} would hold 17 tokens, over the plan's KV budget of 16 tokens (the "
            f"request's sequence_length)")
    assert first.sessions[sid].tokens == 10
    whole = WholeSession(stages[1])
    whole.step(prompt[:10])
    x, position = ids(prompt[10:]), 10
    while position < 16:
        logits = last.forward(sid, first.forward(sid, x, position)["hidden"], position)["logits"]
        assert torch.equal(logits, whole.step(x[0].tolist())), f"position {position}"
        position += x.shape[1]
        x = ids([int(logits.argmax())])
    refused(lambda: first.forward(sid, ids([65]), 16),
            f"{FIRST}: session {sid[:8]} would hold 17 tokens, over the plan's KV budget of 16 tokens (the "
            f"request's sequence_length)")
    assert first.sessions[sid].tokens == last.sessions[sid].tokens == 16


def test_an_idle_session_expires_and_frees_its_place(stages: tuple[list[StageHost], Any]) -> None:
    """``ttl_s`` = 1: a session used every 0.6 s outlives it; one idle for longer is gone (its step refused in one
    line) and its place in the budget is free."""
    h = host(stages, sessions=1, ttl_s=1.0)
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    h.forward(a, ids(PROMPTS[0][:4]), 0)
    for position in range(4, 6):
        time.sleep(0.6)
        h.forward(a, ids([65]), position)
    refused(lambda: h.forward(b, ids(PROMPTS[1]), 0),
            f"{FIRST}: 1 sessions are open, the plan's KV budget is 1 (the request's batch_size); close one or wait "
            f"1 s for an idle one to expire")
    time.sleep(1.1)
    h.forward(b, ids(PROMPTS[1]), 0)
    assert set(h.sessions) == {b}
    refused(lambda: h.forward(a, ids([65]), 6),
            f"{FIRST}: no session {a[:8]} (closed, expired after 1 s idle, or opened on another process)")


def test_closing_a_session_frees_it(stages: tuple[list[StageHost], Any]) -> None:
    h = host(stages, sessions=1)
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    h.forward(a, ids(PROMPTS[0]), 0)
    assert h.close(a)
    assert h.sessions == {}
    assert not h.close(a)
    refused(lambda: h.forward(a, ids([65]), len(PROMPTS[0])),
            f"{FIRST}: no session {a[:8]} (closed, expired after 300 s idle, or opened on another process)")
    h.forward(b, ids(PROMPTS[1]), 0)  # the budget of one session has room again
    assert set(h.sessions) == {b}

