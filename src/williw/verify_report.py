"""What `williw.verify` reports, how outputs are compared, and how a stage's time and memory are measured."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MEMORY_METHOD = "peak RSS sampled every 5 ms while the stage loads and runs; delta over the RSS before it"
# Bit-exact in float32 and float64: the stages run the very operations of the full model, in the same order.
# Half precision gets a margin in case a kernel picks another blocking for a differently aligned tensor:
# 8 units of the last place at 1.0 (bfloat16 has 8 significant bits, float16 11).
TOLERANCES = {"float32": (0.0, 0.0), "float64": (0.0, 0.0), "bfloat16": (0.0, 8 * 2**-7),
              "float16": (0.0, 8 * 2**-10)}


@dataclass(frozen=True)
class StageReport:
    """One stage: blocks ``[start, end)``, its output compared at its boundary with the full model's."""

    stage: int
    node_id: str
    blocks: tuple[int, int]
    tensors: int
    parameters: int
    load_s: float
    run_s: float
    peak_rss_bytes: int
    rss_delta_bytes: int
    max_abs_diff: float | None
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True)
class OutputDiff:
    """``max_rel_diff`` is the largest absolute difference over the largest reference magnitude."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float
    top1_agree: bool | None
    match: bool


@dataclass(frozen=True)
class VerifyReport:
    model_dir: str
    architecture: str
    mode: str  # "pipeline" or "reassembled"
    note: str
    dtype: str
    prompt: str
    tokens: int
    token_source: str  # "tokenizer" or "bytes" (UTF-8 bytes modulo the vocabulary size)
    atol: float
    rtol: float
    reference: StageReport
    stages: tuple[StageReport, ...]
    outputs: tuple[OutputDiff, ...]
    failure: str | None
    memory_method: str = MEMORY_METHOD

    @property
    def ok(self) -> bool:
        return self.failure is None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def compare(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> OutputDiff:
    """Element-wise comparison: a match needs ``|got - want| <= atol + rtol * |want|`` everywhere (and, for
    logits, the same top-1 token at every position)."""
    diff = (got.double() - want.double()).abs()
    scale = want.double().abs().max().item()
    max_abs = diff.max().item()
    within = bool((diff <= atol + rtol * want.double().abs()).all())
    top1 = bool((got.argmax(-1) == want.argmax(-1)).all()) if name == "logits" else None
    return OutputDiff(name=name, shape=tuple(want.shape), max_abs_diff=max_abs,
                      max_rel_diff=max_abs / scale if scale else max_abs, top1_agree=top1,
                      match=within and top1 is not False)


_SUBJECT = {"logits": "the logits differ", "last_hidden_state": "the last hidden state differs",
            "pooler_output": "the pooler output differs"}


def differs(what: str, d: OutputDiff, atol: float, rtol: float) -> str:
    """``what`` is an output name or a phrase ending in a verb."""
    what = _SUBJECT.get(what, what)
    tol = "exact" if atol == 0 and rtol == 0 else f"atol {atol:g}, rtol {rtol:g}"
    top1 = ", top-1 differs" if d.top1_agree is False else ""
    return f"{what} from the full model's (max abs diff {d.max_abs_diff:.3g}, tolerance {tol}{top1})"


class Meter:
    """Wall time and peak RSS of a block of code (a 5 ms sampling thread)."""

    def __enter__(self) -> Meter:
        self.before = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # Linux without psutil: resident pages are the second field of statm
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
