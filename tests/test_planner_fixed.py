"""Hand-chosen cuts: the same layout rules as the search, checked by validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from williw.errors import PlanError
from williw.metadata import generate_metadata
from williw.planner import pipeline_from_cuts, validate_split_plan


@pytest.mark.parametrize("cuts", [[], [1], [1, 3], [1, 2, 3]])
def test_cuts_give_a_valid_pipeline(tiny_llama_tied_bf16: Path, cuts: list[int]) -> None:
    meta = generate_metadata(tiny_llama_tied_bf16)

    plan = pipeline_from_cuts(meta, cuts)

    assert validate_split_plan([x.name for x in meta.layers], plan, metadata=meta) == []
    assert [a.blocks for a in plan.assignments] == list(zip([0, *cuts], [*cuts, 4], strict=True))
    last = plan.assignments[-1]
    assert last.shared_tensors == (("model.embed_tokens.weight",) if cuts else ())
    assert sum(a.bytes for a in plan.assignments) == meta.total_bytes + (meta.tied_lm_head.bytes if cuts else 0)
    assert sum(a.total_compute for a in plan.assignments) == pytest.approx(meta.total_compute, rel=1e-12)


@pytest.mark.parametrize(("cuts", "ids", "message"), [
    ([2, 2], None, "cuts [2, 2] must increase strictly within (0, 4)"),
    ([0], None, "cuts [0] must increase strictly within (0, 4)"),
    ([1], ["a"], "2 stages need 2 node ids, got 1"),
])
def test_bad_cuts(tiny_llama: Path, cuts: list[int], ids: list[str] | None, message: str) -> None:
    with pytest.raises(PlanError) as err:
        pipeline_from_cuts(generate_metadata(tiny_llama), cuts, ids)
    assert str(err.value) == message
