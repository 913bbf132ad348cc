"""Stages in the precision a node holds: bfloat16 and float16 compute, int8 and int4 weight-only linears on torch's
own kernels. On the CPU a quantized pipeline gives the same bits as the whole model quantized the same way
(`williw.quantize.quantize_linears` on both sides), and a fleet of mixed precisions generates token for token what
the whole model with the same per-block conversions generates."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from williw import tinymodels  # noqa: E402
from williw.errors import GenerateError, VerifyError  # noqa: E402
from williw.metadata import generate_metadata  # noqa: E402
from williw.planner import pipeline_from_cuts  # noqa: E402
from williw.precision import int4_group_size, linear_weight_bytes  # noqa: E402
from williw.progress import quiet_transformers  # noqa: E402
from williw.quantize import quantize_linears  # noqa: E402
from williw.runtime import load_host  # noqa: E402
from williw.splitter import split_all  # noqa: E402
from williw.stages import align, block_stack, cache_argument  # noqa: E402
from williw.verify import verify_shards  # noqa: E402

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]


def _wide(path: Path, model_type: str, layers: int = 4, **overrides) -> Path:
    """A tiny model with weights wide enough that greedy decoding does not repeat one token."""
    tinymodels.build_family(path, model_type, layers=layers, **overrides)
    with quiet_transformers():
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.3)
        model.save_pretrained(path)
    return path


def _split(model: Path, cuts: list[int], out: Path):
    plan = pipeline_from_cuts(generate_metadata(model), cuts, [f"n{i}" for i in range(len(cuts) + 1)])
    split_all(model, plan, out)
    return plan


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize(("model_type", "cuts", "overrides"), [
    ("llama", [2], {}), ("qwen2", [1, 3], {"tie_word_embeddings": True}), ("gemma2", [2], {}),
    ("mixtral", [1, 2, 3], {}), ("gpt2", [2], {})])
def test_quantized_stages_are_bit_exact_against_the_whole_model_quantized_alike(
        tmp_path: Path, model_type: str, cuts: list[int], overrides: dict, weights: str) -> None:
    model = _wide(tmp_path / "m", model_type, **overrides)
    plan = _split(model, cuts, tmp_path / "shards")
    report = verify_shards(model, plan, tmp_path / "shards", dtype="bfloat16", weights=weights, atol=0, rtol=0)
    assert report.ok, report.failure
    assert all(o.max_abs_diff == 0 for o in report.outputs)
    assert [s.max_abs_diff for s in report.stages[:-1]] == [0.0] * len(cuts)


def test_a_quantized_stage_is_not_the_float_model(tmp_path: Path) -> None:
    """The check above can fail: int8 stages against the unquantized whole model differ."""
    model = _wide(tmp_path / "m", "llama")
    plan = _split(model, [2], tmp_path / "shards")
    exact = verify_shards(model, plan, tmp_path / "shards", dtype="bfloat16", atol=0, rtol=0)
    assert exact.ok
    from williw import verify

    real = verify._reference
    try:  # the reference left unquantized
        verify._reference = lambda *a: real(*a[:-1], ("as-stored", "cpu"))
        mixed = verify_shards(model, plan, tmp_path / "shards", dtype="bfloat16", weights="int8", atol=0, rtol=0)
    finally:
        verify._reference = real
    assert not mixed.ok and "differs" in mixed.failure


def _whole(model: Path, dtype: torch.dtype = torch.float32):
    with quiet_transformers():
        whole = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
    align(whole)
    whole.generation_config.eos_token_id = None
    whole.generation_config.pad_token_id = 0
    return whole


def _generate(whole, n: int = 16) -> list[int]:
    with quiet_transformers(), torch.no_grad():
        return whole.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False)[0, len(PROMPT):].tolist()


def _run(hosts, n: int = 16) -> list[int]:
    x, start, got = torch.tensor([PROMPT]), 0, []
    for _ in range(n):
        h = x
        for host in hosts:
            out = host.forward("s" * 32, h, start)
            h = out.get("hidden", out.get("logits"))
        token = int(h[0].argmax())
        got.append(token)
        start += x.shape[1]
        x = torch.tensor([[token]])
    return got


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_greedy_generation_over_quantized_stages_equals_the_whole_model_quantized_alike(
        tmp_path: Path, weights: str) -> None:
    model = _wide(tmp_path / "m", "llama")
    _split(model, [1, 3], tmp_path / "shards")
    whole = _whole(model, torch.bfloat16)
    counts = quantize_linears(list(block_stack(whole)[1]), weights)
    want = _generate(whole)
    assert len(set(want)) >= 8 and counts[weights] == 4 * 7
    hosts = [load_host(tmp_path / "shards" / f"n{i}", b, f"n{i}", max_sessions=1, max_tokens=64,
                       dtype="bfloat16", weights=weights) for i, b in enumerate([(0, 1), (1, 3), (3, 4)])]
    assert [h.converted[weights] for h in hosts] == [7, 14, 7]
    assert _run(hosts) == want


def test_a_mixed_fleet_generates_what_the_whole_model_with_the_same_conversions_generates(tmp_path: Path) -> None:
    """Stages in float32, bfloat16 and int8 (bfloat16 compute); hidden states cross in the sender's dtype and are
    cast on arrival. The reference is the whole model with the same per-block conversions: blocks [2, 4) in
    bfloat16, blocks [4, 6) and the head in bfloat16 with int8 linears, each stage's inputs cast on entry."""
    model = _wide(tmp_path / "m", "llama", layers=6)
    _split(model, [2, 4], tmp_path / "shards")
    whole = _whole(model)
    _, stack = block_stack(whole)
    bf16 = torch.bfloat16
    for i in range(2, 6):
        stack[i].to(bf16)
    quantize_linears([stack[i] for i in range(4, 6)], "int8")
    whole.model.norm.to(bf16)
    whole.lm_head.to(bf16)

    def cast(_m, args, kwargs):
        def to(v):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v.to(bf16)
            return tuple(to(u) for u in v) if isinstance(v, tuple) else v
        return tuple(to(a) for a in args), {k: to(v) for k, v in kwargs.items()}

    for i in range(2, 6):  # each bfloat16 block's inputs (the hidden state, the rotary tables) as its stage has them
        stack[i].register_forward_pre_hook(cast, with_kwargs=True)
    whole.model.norm.register_forward_pre_hook(cast, with_kwargs=True)
    # generate() initialises every cache layer at the model's dtype up front; a cache filled layer by layer keeps
    # each layer's own (as each stage's cache does)
    cache, x, want = transformers.DynamicCache(config=whole.config), torch.tensor([PROMPT]), []
    with torch.no_grad():
        for _ in range(16):
            logits = whole(input_ids=x, **{cache_argument(whole): cache}, use_cache=True).logits
            want.append(int(logits[0, -1].argmax()))
            x = torch.tensor([[want[-1]]])
    assert len(set(want)) >= 8
    hosts = [load_host(tmp_path / "shards" / f"n{i}", b, f"n{i}", max_sessions=1, max_tokens=64, dtype=d, weights=w)
             for i, (b, d, w) in enumerate([((0, 2), "float32", "as-stored"), ((2, 4), "bfloat16", "as-stored"),
                                            ((4, 6), "bfloat16", "int8")])]
    assert _run(hosts) == want


def test_int8_leaves_widths_its_kernel_misreads_at_the_compute_dtype(tmp_path: Path) -> None:
    """torch 2.13's CPU int8 kernel with bfloat16 activations read past rows of 40 or 100 inputs (NaN, Inf, a
    segfault with a prefill): such linears stay at bfloat16, in the stages and the whole model alike."""
    model = _wide(tmp_path / "m", "llama", hidden_size=40, intermediate_size=96)
    plan = _split(model, [2], tmp_path / "shards")
    report = verify_shards(model, plan, tmp_path / "shards", dtype="bfloat16", weights="int8", atol=0, rtol=0)
    assert report.ok, report.failure
    host = load_host(tmp_path / "shards" / "n0", (0, 2), "n0", max_sessions=1, max_tokens=64, dtype="bfloat16",
                     weights="int8")
    assert host.converted == {"int8": 2, "int4": 0, "kept": 2 * 6}  # only down_proj has 96 inputs; 40 elsewhere


def test_int4_takes_only_linears_its_kernels_can_run() -> None:
    assert [int4_group_size(n, k) for n, k in [(64, 4096), (128, 64), (96, 96), (50, 64), (64, 48)]] == \
        [128, 64, 32, None, None]
    assert linear_weight_bytes((64, 4096), "int8", "bfloat16") == 64 * 4096 + 64 * 2
    assert linear_weight_bytes((64, 4096), "int4", "bfloat16") == 64 * 4096 // 2 + 2 * 64 * 32 * 2
    assert linear_weight_bytes((50, 64), "int4", "float32") == 50 * 64 * 4  # kept at the compute dtype


def test_int4_on_mps_is_refused_in_one_line(tmp_path: Path) -> None:
    model = _wide(tmp_path / "m", "llama")
    _split(model, [2], tmp_path / "shards")
    with pytest.raises(GenerateError, match=r"^n0: int4 weights need torch's CPU or CUDA int4 kernels; on MPS use "
                                            r"int8 or as-stored$"):
        load_host(tmp_path / "shards" / "n0", (0, 2), "n0", max_sessions=1, max_tokens=64, dtype="float16",
                  weights="int4", device="mps")
    with pytest.raises(VerifyError, match="^weights 'int2' is not one of as-stored, int8, int4$"):
        verify_shards(model, tmp_path / "nope.json", tmp_path / "shards", weights="int2")
