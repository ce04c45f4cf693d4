"""The labelled data set of `bench/risk_dataset.py`: deterministic for a seed, the requested size
and fraud share, every fraud family shaped like the pattern it stands for, and the legit
confounders present (so the benchmark's figures mean something)."""

from __future__ import annotations

import importlib
import sys
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def rd() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("risk_dataset")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def ds(rd: ModuleType):
    return rd.generate(seed=11, orders=1000)


def _most_in_an_hour(times: list) -> int:
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= timedelta(hours=1):
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def test_a_seed_gives_the_same_data_set(rd: ModuleType) -> None:
    a = rd.generate(seed=7, orders=1000)
    b = rd.generate(seed=7, orders=1000)
    assert a.orders == b.orders
    assert a.members == b.members and a.proxy_list == b.proxy_list
    assert rd.generate(seed=8, orders=1000).orders != a.orders


@pytest.mark.parametrize("share", [0.05, 0.10])
def test_requested_size_and_fraud_share(rd: ModuleType, share: float) -> None:
    ds = rd.generate(seed=3, orders=1000, fraud_share=share)
    counted = ds.counted
    assert len(counted) == 1000
    fraud = sum(o.label == "fraud" for o in counted)
    assert abs(fraud / 1000 - share) <= 0.005
    assert {o.family for o in counted if o.label == "fraud"} == set(rd.FRAUD)
    assert {o.family for o in counted if o.label == "legit"} == set(rd.LEGIT)
    assert all(ds.start <= o.at < ds.end for o in counted)
    assert ds.orders == sorted(ds.orders, key=lambda o: o.at)


def test_fraud_families_have_their_patterns(ds) -> None:
    incidents = defaultdict(list)
    for o in ds.counted:
        if o.label == "fraud":
            incidents[(o.family, o.incident)].append(o)
    assert all(o.pay != "api" for group in incidents.values() for o in group)
    nets_used = singles_used = 0
    for (family, _), group in incidents.items():
        if family == "velocity_burst":  # one IP or one browser, many orders within the hour
            by_key = defaultdict(list)
            for o in group:
                by_key[("ip", o.ip)].append(o.at)
                by_key[("device", o.device)].append(o.at)
            assert max(_most_in_an_hour(t) for t in by_key.values()) >= 6
        elif family == "account_many_buyers":  # one account, three or more payers in a day
            assert len({o.account for o in group}) == 1 and group[0].account
            assert len({o.buyer for o in group}) >= 3
            assert max(o.at for o in group) - min(o.at for o in group) < timedelta(hours=24)
        elif family == "new_account_big":  # a member under three days old, a large order
            for o in group:
                assert o.buyer_kind == "member"
                assert o.at - ds.members[o.buyer].created_at < timedelta(days=3)
                assert o.amount_cents >= 19000
            assert sum(o.amount_cents >= 30000 for o in group) >= len(group) // 2
        else:  # every order from an IP on the proxy list
            assert family == "proxy_ip"
            for o in group:
                assert ds.is_proxy(o.ip)
                singles_used += o.ip in ds.proxy_list
                nets_used += o.ip not in ds.proxy_list
    assert nets_used and singles_used


def test_legit_traffic_has_the_confounders(ds) -> None:
    legit = [o for o in ds.counted if o.label == "legit"]
    api = [o for o in legit if o.pay == "api"]
    assert api and all(o.buyer_kind == "reseller" for o in api)
    by_ip = defaultdict(list)
    for o in api:
        by_ip[o.ip].append(o.at)
    assert max(_most_in_an_hour(t) for t in by_ip.values()) >= 6  # bursts a velocity rule sees
    vpn = [o for o in legit if ds.is_proxy(o.ip)]
    assert vpn and all(o.amount_cents < 10000 for o in vpn)
    family, in_window = defaultdict(set), defaultdict(set)
    for o in ds.orders:
        if o.family == "family_shared_account":
            family[o.account].add(o.buyer)
            if o.counted:
                in_window[o.account].add(o.buyer)
    assert family and all(len(buyers) == 2 for buyers in family.values())
    assert any(len(buyers) == 2 for buyers in in_window.values())
    young = [
        o
        for o in legit
        if o.family == "new_member" and o.at - ds.members[o.buyer].created_at < timedelta(days=3)
    ]
    assert young
    assert any(o.family == "guest" for o in legit) and any(not o.paid for o in ds.orders)
    assert any(not o.scored and o.at < ds.start for o in ds.orders)  # history before the window
