"""Many more models than memory: the many-models benchmark's scenario, shorter, with assertions.

60 models (50 copies of the demo CNN, 10 of the text classifier) under lazy model control and a
memory budget that holds about 8 CNNs, Zipf-distributed traffic from 4 clients for 20 s: nothing
fails, the accounted footprint never goes over the budget (sampled every 200 ms), models are
evicted and loaded again, and the hot ones stay resident.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from many_models import report, scenario  # noqa: E402


def test_zipf_traffic_over_60_models_under_a_budget_loses_nothing():
    r = scenario(seconds=20, concurrency=4, budget_mib=160)
    print(report(r))
    assert r["requests"] > 100
    assert r["failed"] == 0, r["failures"]
    assert r["samples"], "no memory samples"
    assert 0 < r["max_resident_mib"] <= r["budget_mib"], report(r)
    # more models were used than fit: some were evicted and loaded again on demand
    assert r["distinct_models"] > 8
    assert r["evictions"] > 0 and r["cold"] > 0 and r["loads"] > 0
    # the most popular model stays in memory: past its first load (which the first requests
    # all wait for), its requests are warm
    assert r["top_model_hit_rate"] >= 0.8, report(r)
