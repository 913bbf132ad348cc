"""What the README's "Generating over the nodes" says about generation, each checked against the whole model:

- sampling at a temperature with a seed: the same seed gives the same tokens, another seed others, and they are
  what ``softmax(logits / T)`` sampled with ``torch.multinomial`` on a ``torch.Generator`` seeded by the seed gives
  on the whole model, step by step;
- a node that dropped a version's stage mid-generation: its 404 restarts the prefill on the pipeline ``renew``
  gives, with the prompt and the tokens so far, and the tokens still equal the whole model's;
- the KV lengths of sliding-window models (Gemma 3's sliding and full layers, Mistral's window) on stages that start
  on either kind of layer: greedy generation equals ``model.generate`` for prompts longer than the window;
- caller-driven (``Pipeline(chained=False)``) gives the chained tokens, and the timing headers hold one value per
  stage and per link;
- streamed ``/v1/chat/completions`` (the ``openai`` client) gives the plain answer's text and finish reason.

The first three run the stages in this process (`fleetproc.LocalStages`: the agents' server and stage service,
real HTTP); the last two on one real fleet for the module (`fleetproc.Fleet`: a worker, three node agents, a
model server, ``williw serve-api``). Every model is drawn wide enough (`fleetproc.WIDE`) that its greedy tokens
vary, so a pipeline that loses its context cannot match by chance.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fleetproc import EOS, Fleet, LocalStages, WholeSession, build_model, greedy_reference, load_whole  # noqa: E402
from williw.pipeline import StageGone, generate_tokens  # noqa: E402
from williw.runtime import decode_tensor, encode_tensor  # noqa: E402

PROMPT = list(range(40, 60))  # 20 tokens: longer than the sliding windows of 8
NODES = {"node-a": 8.0, "node-b": 4.0, "node-c": 2.0}
# 5 MB each: any node holds the 1 MB model, and the fastest plan (by TFLOPS) uses all three.
MEMORY_GB = 0.005
S, F = "sliding_attention", "full_attention"
GEMMA3_LAYERS = [S, S, F, S, F, S]


def varied(tokens: list[int], n: int) -> list[int]:
    """``tokens``, asserted to hold at least half as many distinct tokens as ``n``: the reference says something."""
    assert len(set(tokens)) >= n // 2, tokens
    return tokens


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("claims") / "llama", "llama")


@pytest.fixture(scope="module")
def whole(llama: Path) -> Any:
    return load_whole(llama)


@pytest.fixture(scope="module")
def local(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStages]:
    stages = LocalStages(llama, tmp_path_factory.mktemp("local"))
    try:
        stages.add_version(1, [2, 4], list(NODES))
        yield stages
    finally:
        stages.close()


def sampled_reference(whole: Any, ids: list[int], n: int, temperature: float, seed: int) -> list[int]:
    """The README's rule on the whole model: each step's last logits, ``softmax(logits / T)``, one
    ``torch.multinomial`` draw from a ``torch.Generator`` seeded with ``seed``."""
    session, gen, out = WholeSession(whole), torch.Generator().manual_seed(seed), []
    x = ids
    for _ in range(n):
        probs = torch.softmax(session.step(x)[0] / temperature, dim=-1)
        out.append(int(torch.multinomial(probs, 1, generator=gen)))
        x = out[-1:]
    return out


def test_seeded_sampling_follows_the_documented_rule(local: LocalStages, whole: Any) -> None:
    def sample(seed: int) -> list[int]:
        return list(generate_tokens(local.pipeline(1), PROMPT, max_new_tokens=24, temperature=0.8, seed=seed))

    want = varied(sampled_reference(whole, PROMPT, 24, 0.8, 7), 24)
    assert want != greedy_reference(whole, PROMPT, 24)  # the temperature matters
    assert sample(7) == want
    assert sample(7) == want
    assert sample(8) != want
    # Each generation closed its session on every stage at the end.
    assert [local.sessions(n, 1) for n in NODES] == [0, 0, 0]


def test_a_dropped_version_restarts_the_prefill_with_the_tokens_so_far(llama: Path, whole: Any,
                                                                        tmp_path: Path) -> None:
    """Version 1 on three stages; after 6 tokens the last node drops it (a re-plan to version 2, two stages, is in
    force): the step's 404 comes back along the chain, and the generation goes on through ``renew``'s pipeline,
    token for token ``model.generate``'s."""
    stages = LocalStages(llama, tmp_path)
    try:
        stages.add_version(1, [2, 4], list(NODES))
        stages.add_version(2, [3], ["node-a", "node-c"])
        renewed = []

        def renew() -> Any:
            renewed.append(stages.pipeline(2))
            return renewed[-1]

        want = varied(greedy_reference(whole, PROMPT, 16), 16)
        tokens = generate_tokens(stages.pipeline(1), PROMPT, max_new_tokens=16, renew=renew)
        got = [next(tokens) for _ in range(6)]
        assert (len(renewed), stages.sessions("node-a", 1), stages.sessions("node-c", 1)) == (0, 1, 1)
        stages.drop("node-c", 1)
        got += list(tokens)
        assert got == want
        assert len(renewed) == 1
        # The version-1 session was closed where it was open; version 2's at the end.
        assert [stages.sessions(n, v) for n in NODES for v in (1, 2)] == [0] * 6
    finally:
        stages.close()


def test_a_version_dropped_before_the_prefill_restarts_too(llama: Path, whole: Any, tmp_path: Path) -> None:
    """The pipeline was looked up on version 1 just before the last node, with version 2 in force, dropped it."""
    stages = LocalStages(llama, tmp_path)
    try:
        stages.add_version(1, [2, 4], list(NODES))
        stages.add_version(2, [3], ["node-a", "node-c"])
        stale = stages.pipeline(1)
        stages.drop("node-c", 1)
        got = list(generate_tokens(stale, PROMPT, max_new_tokens=8, renew=lambda: stages.pipeline(2)))
        assert got == greedy_reference(whole, PROMPT, 8)
    finally:
        stages.close()


def test_a_dropped_version_without_renew_fails_in_one_line(llama: Path, tmp_path: Path) -> None:
    stages = LocalStages(llama, tmp_path)
    try:
        stages.add_version(1, [3], ["node-a", "node-b"])
        stages.add_version(2, [3], ["node-a", "node-b"])
        tokens = generate_tokens(stages.pipeline(1), PROMPT, max_new_tokens=8)
        next(tokens)
        stages.drop("node-b", 1)
        with pytest.raises(StageGone) as exc:
            next(tokens)
        assert str(exc.value) == f"node 'node-b' holds no shard of request {stages.request_id} version 1"
    finally:
        stages.close()


@pytest.fixture(scope="module")
def sliding_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sliding")
    return {"gemma3_text": build_model(root / "gemma3", "gemma3_text", sliding_window=8, layer_types=GEMMA3_LAYERS),
            "mistral": build_model(root / "mistral", "mistral", sliding_window=8)}


# Gemma 3's layers: S S F S F S. Each case has a later stage that starts on a layer of the other kind than the
# model's first layer of a kind it also runs, so its cache lengths must be read by kind from its own layers.
SLIDING_CASES = {
    "gemma3-[0,2)-[2,6)": ("gemma3_text", [2]),  # the second stage starts on a full layer
    "gemma3-[0,3)-[3,6)": ("gemma3_text", [3]),  # on a sliding one, its first full layer is layer 4
    "gemma3-[0,1)-[1,4)-[4,6)": ("gemma3_text", [1, 4]),
    "gemma3-[0,2)-[2,3)-[3,6)": ("gemma3_text", [2, 3]),  # a stage of one full layer, no sliding one
    "mistral-[0,3)-[3,6)": ("mistral", [3]),
    "mistral-[0,2)-[2,4)-[4,6)": ("mistral", [2, 4]),
}


def chunked_greedy(step: Callable[[list[int], int], Any], n: int) -> list[int]:
    """Greedy tokens after a prefill in two chunks, 12 tokens then 8 (a step of several tokens over a full sliding
    window: the forward builds a real mask from the cache's lengths, which a one-token step lets it skip)."""
    logits = step(PROMPT[:12], 0)
    logits, out = step(PROMPT[12:], 12), []
    while len(out) < n:
        out.append(int(logits.argmax()))
        logits = step(out[-1:], len(PROMPT) + len(out) - 1)
    return out


@pytest.mark.parametrize(("family", "cuts"), SLIDING_CASES.values(), ids=SLIDING_CASES.keys())
def test_sliding_window_models_generate_like_the_whole_model(sliding_models: dict[str, Path], family: str,
                                                            cuts: list[int], tmp_path: Path) -> None:
    """Greedy generation equals ``model.generate``'s; with the prefill in two chunks, it equals the whole model's
    run in the same chunks."""
    model = sliding_models[family]
    whole = load_whole(model)
    want = varied(greedy_reference(whole, PROMPT, 20), 20)
    reference = WholeSession(whole)
    want_chunked = varied(chunked_greedy(lambda ids, _start: reference.step(ids), 20), 20)
    stages = LocalStages(model, tmp_path)
    try:
        stages.add_version(1, cuts, [f"node-{i}" for i in range(len(cuts) + 1)])
        assert list(generate_tokens(stages.pipeline(1), PROMPT, max_new_tokens=20, eos_ids=(EOS,))) == want
        pipeline, session = stages.pipeline(1), uuid.uuid4().hex
        try:
            assert chunked_greedy(lambda ids, start: pipeline.step(session, torch.tensor([ids]), start), 20) == \
                want_chunked
        finally:
            pipeline.end(session)
    finally:
        stages.close()


@pytest.fixture(scope="module")
def fleet(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(llama, tmp_path_factory.mktemp("fleet"), NODES, MEMORY_GB)
    try:
        yield fleet.start(serve_api=True)
    finally:
        fleet.stop()


def test_caller_driven_gives_the_chained_tokens_and_per_hop_timings(fleet: Fleet, whole: Any) -> None:
    """Both modes give ``model.generate``'s tokens; after every step each lists one round trip and one compute
    time per stage, and `overhead_ms` one finite, non-negative transport cost per hop (up to the headers'
    rounding to 1 us)."""
    want = varied(greedy_reference(whole, PROMPT, 16), 16)
    for chained in (True, False):
        pipeline = fleet.pipeline(chained=chained)
        try:
            assert len(pipeline.hops) == 3
            got = []
            for token in generate_tokens(pipeline, PROMPT, max_new_tokens=16):
                got.append(token)
                assert len(pipeline.hop_ms) == len(pipeline.compute_ms) == 3
                assert all(math.isfinite(ms) and ms > 0 for ms in (*pipeline.hop_ms, *pipeline.compute_ms))
                overhead = pipeline.overhead_ms()
                assert len(overhead) == 3 and all(math.isfinite(ms) and ms > -0.01 for ms in overhead), overhead
            assert got == want, f"chained={chained}"
        finally:
            pipeline.close()


def test_a_chained_answer_lists_each_stages_compute_and_each_links_round_trip(fleet: Fleet) -> None:
    """One request to the first stage: ``X-Williw-Compute-Ms`` has a value per stage, ``X-Williw-Next-Ms`` one per
    link, each link's round trip covering the next stage's compute and the links after it."""
    pipeline = fleet.pipeline()
    session = "ab" * 16
    try:
        hop = pipeline.hops[0]
        r = httpx.post(f"{hop.url}/stage/{fleet.request_id}/v1/forward", content=encode_tensor("x", torch.tensor(
            [PROMPT])), params={"session": session, "start": "0", "chain": "1"}, timeout=60)
        assert r.status_code == 200, r.text
        assert decode_tensor(r.content, "logits", "test").shape == (1, 257)
        compute = [float(v) for v in r.headers["X-Williw-Compute-Ms"].split(",")]
        links = [float(v) for v in r.headers["X-Williw-Next-Ms"].split(",")]
        assert (len(compute), len(links)) == (3, 2)
        assert links[0] >= compute[1] + links[1] - 0.01 and links[1] >= compute[2] - 0.01, (compute, links)
    finally:
        pipeline.end(session)
        pipeline.close()


def test_streamed_chat_completion_gives_the_plain_answer(fleet: Fleet, llama: Path, whole: Any) -> None:
    openai = pytest.importorskip("openai")
    messages = [{"role": "user", "content": "Say something"}]
    tok = transformers.AutoTokenizer.from_pretrained(llama)
    ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
               ["input_ids"])
    want = varied(greedy_reference(whole, ids, 24), 24)
    text = tok.decode(want, skip_special_tokens=True)
    finish = "stop" if EOS in want else "length"
    oai = openai.OpenAI(base_url=fleet.api_url, api_key="unused", max_retries=0, timeout=60)

    plain = oai.chat.completions.create(model="t/tiny", messages=messages, max_tokens=24, temperature=0)
    assert (plain.choices[0].message.content, plain.choices[0].finish_reason) == (text, finish)
    assert plain.usage.completion_tokens == len(want)

    chunks = list(oai.chat.completions.create(model="t/tiny", messages=messages, max_tokens=24, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + [finish]
    assert chunks[-1].choices[0].delta.content is None
    assert len(chunks) > len(want) // 2  # token by token, not one chunk at the end


def test_streamed_text_keeps_a_character_that_starts_after_undecodable_bytes(llama: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Byte tokens ``A``, three stray continuation bytes, then the four bytes of an emoji and ``B``: the text is
    what the tokenizer decodes from all of them (each stray byte a U+FFFD, the emoji whole), streamed or not."""
    from williw import generation

    tok = transformers.AutoTokenizer.from_pretrained(llama)
    a, *emoji, b = tok("A\U0001f600B")["input_ids"]  # A, F0 9F 98 80, B: one token per byte
    tokens = [a, *emoji[1:], *emoji, b]

    class Stub:
        version, hops = 1, ()

        def close(self) -> None:
            pass

    monkeypatch.setattr(generation.Generator, "tokenizer", tok)
    monkeypatch.setattr(generation.Generator, "context_tokens", 512, raising=False)
    monkeypatch.setattr(generation.Generator, "pipeline", lambda self: Stub())
    monkeypatch.setattr(generation, "generate_tokens", lambda *args, **kwargs: iter(tokens))
    gen = generation.Generator("http://127.0.0.1:9", "0" * 32)
    text = "".join(gen.stream([a], generation.Stats(), max_new_tokens=len(tokens)))
    assert tok.decode(tokens) == "A\ufffd\ufffd\ufffd\U0001f600B"
    assert text == tok.decode(tokens)
