"""The LP bound (`planner.relaxation`): it never refutes a threshold some plan meets (exhaustive optimum, with memory,
KV cache and transfers), it is tight where the window bound is not, its proof is checked outside the solver, and
the planner works without highspy."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from test_planner_pipeline import brute_force, build_meta
from test_planner_runtime import runtime_instances
from williw.fleet import Node
from williw.planner.bound import Windows, certified_lower_bound
from williw.planner.branch import certify
from williw.planner.costs import pipeline_model
from williw.planner.pipeline import _Costs, lower_bound
from williw.planner.relaxation import (
    MAX_RUNS,
    REL_TOL,
    Runs,
    _verdict,
    lp_bracket,
    lp_lower_bound,
    refutes,
    refutes_at,
    solve,
)


def with_optimum(objective: str, case) -> tuple[_Costs, float, list[Node]] | None:
    """A `runtime_instances` case's costs over its usable nodes, its exhaustive optimum (> 0) and those nodes; None
    when no plan fits, it costs nothing, or no node or block is left."""
    meta, nodes, batch, context = case
    expected = brute_force(meta, nodes, objective, batch, context)
    model = pipeline_model(meta, batch, context)
    usable = [v for v in nodes if objective == "prefill" or v.memory_bandwidth_gbps]
    if expected is None or expected <= 0 or not usable or model.n == 0:
        return None
    return _Costs(model, usable, objective), expected, usable


@pytest.mark.parametrize("objective", ["prefill", "decode"])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=runtime_instances())
def test_the_lp_never_refutes_a_threshold_that_a_plan_meets(objective: str, case) -> None:
    found = with_optimum(objective, case)
    if found is None:
        return
    c, expected, _ = found
    assert refutes_at(c, expected) is False
    bound = lp_lower_bound(c, expected * 1e-3, expected, math.inf)
    assert bound < expected
    assert bound == expected * 1e-3 or refutes_at(c, bound)


def _forty(seed: int) -> tuple[_Costs, float]:
    """40 blocks of 40-60 GFLOPs over 40 nodes of 1-1000 TFLOPS (bench/planner.py's shapes): a few blocks a node."""
    rng = random.Random(seed)
    meta = build_meta([(rng.randint(40, 60), rng.randint(80, 120)) for _ in range(40)], (0, 200), (30, 200))
    fleet = random.Random(100 + seed)
    nodes = [Node(f"n{i}", round(10 ** fleet.uniform(0, 3), 3), 80.0) for i in range(40)]
    model = pipeline_model(meta)
    return _Costs(model, nodes, "prefill"), lower_bound(model, nodes, "prefill")


@pytest.mark.parametrize("seed", [0, 1, 8])  # the window bound 4.0%, 3.0% and 5.6% below the optimum
def test_the_lp_bound_proves_the_optimum_where_the_window_bound_is_percent_below(seed: int) -> None:
    c, lower = _forty(seed)
    found = certify(c, None, lower, 60.0)
    assert found is not None and found.exact is True
    optimum = c.bottleneck(found.stages)
    window = certified_lower_bound(Windows(c), lower * (1 - 1e-9), optimum)
    lp = lp_lower_bound(c, window, optimum, math.inf)
    assert window < optimum * (1 - 0.01)  # the window bound: more than 1% below
    assert optimum * (1 - 4e-4) < lp < optimum  # the LP's: within its bisection's tolerance (3e-4)


def test_a_coarse_bracket_goes_on_where_it_stopped() -> None:
    c, lower = _forty(0)
    found = certify(c, None, lower, 60.0)
    optimum = c.bottleneck(found.stages)
    window = certified_lower_bound(Windows(c), lower * (1 - 1e-9), optimum)
    lo, top = lp_bracket(c, window, optimum, math.inf, rel_tol=2e-3)
    assert window < lo < top <= lo * (1 + 2e-3) and top <= optimum
    assert refutes_at(c, lo) is True and refutes_at(c, top) is False
    lo2, top2 = lp_bracket(c, lo, top, math.inf)
    assert lo <= lo2 < top2 <= lo2 * (1 + REL_TOL) and top2 <= top
    assert optimum * (1 - 4e-4) < lo2 < optimum


def test_the_lp_counts_the_runs_it_keeps_not_every_run_it_looks_at() -> None:
    # 1,000 blocks over 48 nodes (bench/planner.py's shapes): 168,000 runs looked at, 20,800 kept (0.4 s a solve).
    # The limit once counted the first, and the LP bound was skipped there and at 96 nodes.
    rng = random.Random(0)
    meta = build_meta([(rng.uniform(40, 60), rng.randint(80, 120)) for _ in range(1000)], (0, 10), (30, 10))
    fleet = random.Random(48)
    nodes = [Node(f"n{i}", round(10 ** fleet.uniform(0, 3), 3), 80.0) for i in range(48)]
    model = pipeline_model(meta)
    c = _Costs(model, nodes, "prefill")
    window = certified_lower_bound(Windows(c), lower_bound(model, nodes, "prefill") * (1 - 1e-9), math.inf)
    r = Runs(c, window * 1.001)
    biggest = max(c.rate) * window * 1.001 * (1 + 1e-12)
    looked_at = sum(1 for p in range(model.n) for e in range(p + 1, model.n + 1)
                    if c.amount(p, e, e == model.n) <= biggest and (p, e) != (0, model.n))
    assert looked_at > MAX_RUNS >= r.count == len(r.runs) > 0
    assert Runs(c, window * 1.001, max_runs=r.count - 1).count is None
    assert _verdict(c, window * 1.001, math.inf) is not None


def test_a_proof_is_checked_outside_the_solver() -> None:
    c, lower = _forty(0)
    found = certify(c, None, lower, 60.0)
    below = c.bottleneck(found.stages) * (1 - 1e-3)
    r = Runs(c, below)
    flow, prices = solve(r)
    assert flow < 1 and refutes(r, prices) is True
    assert refutes(r, [0.0] * r.m) is False  # no prices, no proof
    assert refutes(r, [x * 0.5 for x in prices]) is True  # a proof scales
    assert refutes(r, [-x for x in prices]) is False  # negative prices are clipped to 0
    r_above = Runs(c, c.bottleneck(found.stages))
    assert refutes(r_above, solve(r_above)[1]) is False  # at the optimum nothing refutes


def test_planning_works_without_highspy_and_prints_nothing() -> None:
    script = (
        "import sys, random\n"
        "{block}"
        "from test_planner_relaxation import _forty\n"
        "from williw.planner.relaxation import available, lp_lower_bound\n"
        "from williw.planner.branch import certify\n"
        "c, lower = _forty(0)\n"
        "found = certify(c, None, lower, 30.0)\n"
        "print(available(), found.exact, lp_lower_bound(c, lower, 2 * lower, 1e18) > lower)\n"
    )
    for block, expected in (("sys.modules['highspy'] = None\n", "False True False"), ("", "True True True")):
        out = _run(script.format(block=block))
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == expected  # no solver banner on standard output
        assert out.stderr == ""



@pytest.mark.parametrize("fake", [
    "class Highs:  # an old or odd build: it imports, but has no HighsLp\n    pass\n",
    "raise OSError('libhighs.so: cannot open shared object file')  # a broken build\n",
])
def test_planning_works_with_a_broken_highspy(tmp_path: Path, fake: str) -> None:
    (tmp_path / "highspy.py").write_text(fake)
    out = _run(f"import sys, math\nsys.path.insert(0, {str(tmp_path)!r})\n"
               "from test_planner_relaxation import _forty\n"
               "from williw.planner.branch import certify\n"
               "from williw.planner.rounding import at\n"
               "c, lower = _forty(0)\n"
               "found = certify(c, None, lower, 30.0)\n"
               "print(found.exact, at(c, c.bottleneck(found.stages), math.inf))\n")
    assert (out.returncode, out.stdout, out.stderr) == (0, "True None\n", "")


def test_no_time_limit_means_no_limit() -> None:
    c, lower = _forty(0)  # proven optimal in 0.1-0.5 s; with an infinite limit every phase once got no time at all
    found = certify(c, None, lower, math.inf)
    assert found is not None and found.exact is True
    assert found.lower_s == c.bottleneck(found.stages)


def _run(script: str) -> subprocess.CompletedProcess:
    """``script`` in a fresh Python process (its own HiGHS scheduler and banner), from the tests folder."""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parent,
                          timeout=120)


def test_planning_with_standard_output_closed() -> None:
    out = _run("import os, sys\n"
               "os.close(1); sys.stdout = None\n"
               "from test_planner_relaxation import _forty\n"
               "from williw.planner.branch import certify\n"
               "c, lower = _forty(0)\n"
               "sys.stderr.write(str(certify(c, None, lower, 30.0).exact))\n")
    assert (out.returncode, out.stderr) == (0, "True")


def test_the_lp_and_the_applications_own_highspy_solves_leave_each_other_working() -> None:
    # HiGHS has one thread scheduler per process: a solve that asks another thread count than the first fails.
    out = _run("import math, highspy, numpy as np\n"
               "from test_planner_relaxation import _forty\n"
               "from williw.planner.bound import Windows, certified_lower_bound\n"
               "from williw.planner.relaxation import lp_lower_bound\n"
               "def own():\n"
               "    h = highspy.Highs(); h.setOptionValue('output_flag', False)\n"
               "    h.addVars(2, np.zeros(2), np.ones(2)); h.changeColsCost(2, np.arange(2, dtype=np.int32),"
               " np.array([-1.0, -2.0]))\n"
               "    h.addRow(0.0, 1.0, 2, np.arange(2, dtype=np.int32), np.ones(2))\n"
               "    return str(h.run())\n"
               "first = own()\n"
               "c, lower = _forty(0)\n"
               "window = certified_lower_bound(Windows(c), lower * (1 - 1e-9), 1.0)\n"
               "print(first, lp_lower_bound(c, window, 1.0, math.inf) > window * 1.01, own())\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].split() == ["HighsStatus.kOk", "True", "HighsStatus.kOk"]  # after its banner
