"""`kameng gateway-sim` over real HTTP: the EPay protocol of docs/gateway-sim.md and every
notify fault, against a real notify receiver.

One gateway and one receiver serve the whole module (each on its own uvicorn thread); the
gateway is reset and its notify settings restored before every test, and each test uses its
own out_trade_no and receiver path.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from typer.testing import CliRunner

from kameng.payments.gateway_sim.runner import GatewaySimHandle, start_gateway_sim
from kameng.security import epay
from kameng.suppliers.simulator.runner import ServerThread

pytestmark = pytest.mark.timeout(60)

KEY, OTHER_KEY = "test-epay-key", "other-merchant-key"
RETRY = [0, 0.05, 0.05, 0.05]


# -- a notify receiver ---------------------------------------------------------------------------


@dataclass
class Received:
    name: str
    params: dict[str, str]
    at: float


class Receiver:
    """Records every notify GET to /n/{name}; answers `success`, or `fail` the first N times."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.fail_first: dict[str, int] = {}
        self.lock = threading.Lock()
        app = Starlette(routes=[Route("/n/{name}", self.endpoint, methods=["GET"])])
        self.server = ServerThread(app).start()

    def url(self, name: str) -> str:
        return f"{self.server.url}/n/{name}"

    async def endpoint(self, request: Request) -> Response:
        name = request.path_params["name"]
        with self.lock:
            self.received.append(Received(name, dict(request.query_params), time.time()))
            if self.fail_first.get(name, 0) > 0:
                self.fail_first[name] -= 1
                return PlainTextResponse("fail")
        return PlainTextResponse(" SUCCESS\n")

    def got(self, name: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.name == name]

    def wait_for(self, name: str, count: int, timeout: float = 5.0) -> list[Received]:
        wait_until(lambda: len(self.got(name)) >= count, timeout, f"{name}: {count} notifies")
        return self.got(name)


def wait_until(check: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached")
        time.sleep(0.01)


def notifier_idle(shop: Merchant) -> bool:
    """No notify run left at the gateway (read from the test's thread: a run ending meanwhile
    changes the set being counted, which only means "not yet")."""
    try:
        return shop.gw.gateway.notifier.pending == 0
    except RuntimeError:
        return False


# -- fixtures and a merchant-side client ---------------------------------------------------------


@pytest.fixture(scope="module")
def gw() -> Iterator[GatewaySimHandle]:
    with start_gateway_sim(merchants={"1001": KEY, "1002": OTHER_KEY}, notify_retry_s=RETRY) as g:
        yield g


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    try:
        yield rec
    finally:
        rec.server.stop()


class Merchant:
    def __init__(self, gw: GatewaySimHandle) -> None:
        self.gw = gw
        self.http = httpx.Client(base_url=gw.url, timeout=5.0, trust_env=False)

    def form(self, otn: str, notify_url: str, money: str = "12.34", **extra: str) -> dict[str, str]:
        params = {
            "pid": "1001",
            "type": "alipay",
            "out_trade_no": otn,
            "notify_url": notify_url,
            "return_url": "https://shop.example/return?from=epay",
            "name": "Steam 50 礼品卡",
            "money": money,
            "sitename": "Demo shop",
            **extra,
        }
        return epay.signed(params, KEY)

    def submit(self, fields: dict[str, str], *, get: bool = False) -> httpx.Response:
        if get:
            return self.http.get("/submit.php", params=fields)
        return self.http.post("/submit.php", data=fields)

    def cashier(self, otn: str, notify_url: str, money: str = "12.34", **extra: str) -> str:
        """Submit and return the trade_no of the cashier's pay form."""
        page = self.submit(self.form(otn, notify_url, money, **extra))
        assert page.status_code == 200, page.text
        assert 'id="pay"' in page.text
        match = re.search(r'action="/pay/(\d+)"', page.text)
        assert match
        return match.group(1)

    def api(self, act: str, key: str = KEY, pid: str = "1001", **params: str) -> dict[str, Any]:
        reply = self.http.get("/api.php", params={"act": act, "pid": pid, "key": key, **params})
        assert reply.status_code == 200
        body: dict[str, Any] = reply.json()
        return body

    def control(self, path: str, body: Any = None, status: int = 200) -> Any:
        reply = self.http.post(f"/_sim{path}", json=body)
        assert reply.status_code == status, reply.text
        return reply.json()

    def trade(self, otn: str, pid: str = "1001") -> dict[str, Any]:
        found = [
            t
            for t in self.http.get("/_sim/state").json()["trades"]
            if t["out_trade_no"] == otn and t["pid"] == pid
        ]
        assert len(found) == 1
        return found[0]


@pytest.fixture
def shop(gw: GatewaySimHandle) -> Iterator[Merchant]:
    client = Merchant(gw)
    client.control("/reset")
    normal = {"notify": "normal", "notify_delay_s": 0, "duplicate_count": 1}
    client.control("/config", {**normal, "notify_retry_s": RETRY})
    try:
        yield client
    finally:
        client.http.close()


def query_of(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


# -- the browser flow ----------------------------------------------------------------------------


def test_submit_pay_redirect_notify_and_query(shop: Merchant, receiver: Receiver) -> None:
    trade_no = shop.cashier("T-FLOW", receiver.url("flow"))
    assert re.fullmatch(r"\d{20}", trade_no)
    page = shop.submit(shop.form("T-FLOW", receiver.url("flow"))).text
    assert "Steam 50 礼品卡" in page and "12.34" in page and "T-FLOW" in page
    assert 'id="cancel" href="https://shop.example/return?from=epay"' in page
    assert shop.api("order", out_trade_no="T-FLOW")["status"] == 0

    paid = shop.http.post(f"/pay/{trade_no}")
    assert paid.status_code in (302, 303)
    location = paid.headers["location"]
    assert location.startswith("https://shop.example/return?")
    back = query_of(location)
    assert back.pop("from") == "epay"  # the return_url's own query is kept
    assert epay.verify(back, KEY)
    assert back["trade_status"] == "TRADE_SUCCESS" and back["money"] == "12.34"
    assert back["trade_no"] == trade_no and back["out_trade_no"] == "T-FLOW"
    assert "currency" not in back

    (notify,) = receiver.wait_for("flow", 1)
    assert epay.verify(notify.params, KEY)
    assert notify.params == {**back}
    wait_until(lambda: shop.trade("T-FLOW")["notify_state"] == "acked")
    (attempt,) = shop.trade("T-FLOW")["notify_attempts"]
    assert attempt["ok"] and attempt["http_status"] == 200 and attempt["kind"] == "notify"
    assert attempt["url"] == receiver.url("flow") and attempt["body"] == " SUCCESS\n"

    order = shop.api("order", out_trade_no="T-FLOW")
    assert order["code"] == 1 and order["msg"] == "查询订单号成功！" and order["status"] == 1
    assert order["trade_no"] == trade_no and order["money"] == "12.34" and order["pid"] == "1001"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", order["endtime"])
    assert order["param"] == "" and order["buyer"] == "" and "currency" not in order
    assert shop.api("order", trade_no=trade_no)["out_trade_no"] == "T-FLOW"

    # Paying again pays nothing more and sends no second notify.
    again = shop.http.post(f"/pay/{trade_no}")
    assert again.headers["location"] == location
    # A second notify run would have been started before that answer (state `pending`, then a
    # second attempt): the trade is still acknowledged with its one attempt.
    trade = shop.trade("T-FLOW")
    assert (trade["notify_state"], len(trade["notify_attempts"])) == ("acked", 1)
    assert len(receiver.got("flow")) == 1
    # A paid order submitted again: the "already paid" page, with the way back to the shop.
    repeat = shop.submit(shop.form("T-FLOW", receiver.url("flow")))
    assert repeat.status_code == 200 and "该订单已支付" in repeat.text
    assert 'id="pay"' not in repeat.text and "shop.example/return" in repeat.text


def test_get_submit_reuses_the_unpaid_trade_without_return_url(
    shop: Merchant, receiver: Receiver
) -> None:
    fields = shop.form("T-GET", receiver.url("get"))
    del fields["return_url"]
    fields = epay.signed({k: v for k, v in fields.items() if k != "sign"}, KEY)
    first = re.search(r"/pay/(\d+)", shop.submit(fields, get=True).text)
    second = re.search(r"/pay/(\d+)", shop.submit(fields, get=True).text)
    assert first and second and first.group(1) == second.group(1)
    page = shop.submit(fields, get=True).text
    assert 'id="cancel"' not in page
    paid = shop.http.post(f"/pay/{first.group(1)}")
    assert paid.status_code == 200 and "支付成功" in paid.text
    receiver.wait_for("get", 1)
    assert shop.http.post("/pay/99999999999999999999").status_code == 404


def test_currency_and_a_notify_url_with_its_own_query(shop: Merchant, receiver: Receiver) -> None:
    notify_url = receiver.url("cur") + "?channel=7"
    trade_no = shop.cashier("T-CUR", notify_url, currency="CNY", money="0.01")
    shop.http.post(f"/pay/{trade_no}")
    (notify,) = receiver.wait_for("cur", 1)
    assert notify.params.pop("channel") == "7"
    assert notify.params["currency"] == "CNY" and notify.params["money"] == "0.01"
    assert epay.verify(notify.params, KEY)
    assert shop.api("order", out_trade_no="T-CUR")["currency"] == "CNY"
    # The simulator records an attempt once the receiver has answered: wait for the record.
    wait_until(lambda: shop.trade("T-CUR")["notify_state"] == "acked")
    assert shop.trade("T-CUR")["notify_attempts"][0]["url"] == receiver.url("cur")


# -- submit refusals -----------------------------------------------------------------------------


def _resigned(fields: dict[str, str], key: str = KEY, **change: str) -> dict[str, str]:
    plain = {k: v for k, v in {**fields, **change}.items() if k not in ("sign", "sign_type")}
    return epay.signed(plain, key)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: {**f, "sign": "0" * 32}, "签名校验失败"),
        (lambda f: {**f, "name": "tampered"}, "签名校验失败"),
        (lambda f: _resigned(f, OTHER_KEY), "签名校验失败"),
        (lambda f: _resigned(f, pid="9999"), "商户不存在"),
        (lambda f: _resigned(f, money="abc"), "金额不合法"),
        (lambda f: _resigned(f, money="0.00"), "金额不合法"),
        (lambda f: _resigned(f, money="1.234"), "金额不合法"),
        (lambda f: _resigned(f, money="-1"), "金额不合法"),
        (lambda f: _resigned(f, money="²"), "金额不合法"),
        (lambda f: _resigned(f, type="paypal"), "支付方式不支持"),
        (lambda f: _resigned(f, notify_url="ftp://shop.example/n"), "异步通知地址不合法"),
        (lambda f: _resigned(f, out_trade_no="x" * 65), "订单号格式错误"),
        (lambda f: _resigned(f, currency="USD"), "币种不支持"),
    ],
)
def test_submit_refusals_are_400_pages(
    shop: Merchant, receiver: Receiver, mutate: Callable[[dict[str, str]], Any], message: str
) -> None:
    reply = shop.submit(mutate(shop.form("T-BAD", receiver.url("bad"))))
    assert reply.status_code == 400
    assert message in reply.text and 'id="error"' in reply.text
    assert 'id="pay"' not in reply.text
    assert shop.http.get("/_sim/state").json()["trades"] == []


def test_duplicate_out_trade_no_with_another_amount(shop: Merchant, receiver: Receiver) -> None:
    shop.cashier("T-DUP", receiver.url("dup"), money="5.00")
    reply = shop.submit(shop.form("T-DUP", receiver.url("dup"), money="6.00"))
    assert reply.status_code == 400 and "订单号重复" in reply.text
    assert shop.trade("T-DUP")["money"] == "5.00"
    # The same number at another merchant is another trade.
    fields = _resigned(shop.form("T-DUP", receiver.url("dup"), money="6.00"), OTHER_KEY, pid="1002")
    assert shop.submit(fields).status_code == 200
    assert shop.trade("T-DUP", pid="1002")["money"] == "6.00"


# -- notify retries and faults -------------------------------------------------------------------


def test_failed_notifies_are_retried_until_success(shop: Merchant, receiver: Receiver) -> None:
    receiver.fail_first["retry"] = 2
    shop.http.post(f"/pay/{shop.cashier('T-RETRY', receiver.url('retry'))}")
    receiver.wait_for("retry", 3)
    wait_until(lambda: shop.trade("T-RETRY")["notify_state"] == "acked")
    attempts = shop.trade("T-RETRY")["notify_attempts"]
    assert [(a["attempt"], a["ok"], a["body"]) for a in attempts] == [
        (1, False, "fail"),
        (2, False, "fail"),
        (3, True, " SUCCESS\n"),
    ]
    assert attempts[1]["at"] - attempts[0]["at"] >= 0.04


def test_notify_gives_up_after_the_schedule(shop: Merchant) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/n"
    shop.http.post(f"/pay/{shop.cashier('T-DEAD', dead)}")
    wait_until(lambda: shop.trade("T-DEAD")["notify_state"] == "gave_up")
    attempts = shop.trade("T-DEAD")["notify_attempts"]
    assert len(attempts) == len(RETRY)
    assert all(a["http_status"] is None and a["error"] and not a["ok"] for a in attempts)


def test_drop_mode_sends_nothing_until_replayed(shop: Merchant, receiver: Receiver) -> None:
    shop.control("/config", {"notify": "drop"})
    shop.http.post(f"/pay/{shop.cashier('T-DROP', receiver.url('drop'))}")
    # Decided when the trade was paid, before that answer: dropped, so no run was started.
    trade = shop.trade("T-DROP")
    assert trade["status"] == 1 and trade["notify_state"] == "dropped"
    assert trade["notify_attempts"] == []
    assert receiver.got("drop") == []
    assert shop.api("order", out_trade_no="T-DROP")["status"] == 1  # the query still knows

    attempt = shop.control("/trades/T-DROP/notify")
    assert attempt["kind"] == "replay" and attempt["ok"] and attempt["http_status"] == 200
    (notify,) = receiver.got("drop")
    assert epay.verify(notify.params, KEY)
    assert shop.trade("T-DROP")["notify_state"] == "acked"


def test_bad_sign_mode_sends_a_sign_that_does_not_verify(
    shop: Merchant, receiver: Receiver
) -> None:
    shop.control("/config", {"notify": "bad_sign", "notify_retry_s": [0]})
    shop.http.post(f"/pay/{shop.cashier('T-FORGED', receiver.url('forged'))}")
    (notify,) = receiver.wait_for("forged", 1)
    assert re.fullmatch(r"[0-9a-f]{32}", notify.params["sign"])
    assert not epay.verify(notify.params, KEY)
    assert notify.params["out_trade_no"] == "T-FORGED"
    wait_until(lambda: len(shop.trade("T-FORGED")["notify_attempts"]) == 1)
    assert shop.trade("T-FORGED")["notify_attempts"][0]["bad_sign"] is True


def test_duplicate_mode_sends_extra_copies(shop: Merchant, receiver: Receiver) -> None:
    shop.control("/config", {"notify": "duplicate", "duplicate_count": 2})
    shop.http.post(f"/pay/{shop.cashier('T-TWICE', receiver.url('twice'))}")
    copies = receiver.wait_for("twice", 3)
    # The run is over once the gateway has no notify run left (a copy still on its way would
    # keep it): then exactly the notify and its two copies were sent.
    wait_until(lambda: notifier_idle(shop), what="the notify run to end")
    assert len(receiver.got("twice")) == 3
    assert all(c.params == copies[0].params and epay.verify(c.params, KEY) for c in copies)
    wait_until(lambda: len(shop.trade("T-TWICE")["notify_attempts"]) >= 3)
    kinds = [a["kind"] for a in shop.trade("T-TWICE")["notify_attempts"]]
    assert kinds == ["notify", "duplicate", "duplicate"]


def test_notify_delay(shop: Merchant, receiver: Receiver) -> None:
    shop.control("/config", {"notify_delay_s": 0.3})
    trade_no = shop.cashier("T-LATE", receiver.url("late"))
    paid_at = time.time()
    shop.http.post(f"/pay/{trade_no}")
    (notify,) = receiver.wait_for("late", 1)
    assert notify.at - paid_at >= 0.28


# -- control API ---------------------------------------------------------------------------------


def test_sim_pay_with_another_amount(shop: Merchant, receiver: Receiver) -> None:
    shop.cashier("T-SHORT", receiver.url("short"), money="10.00")
    trade = shop.control("/trades/T-SHORT/pay", {"money": "9.00"})
    assert trade["status"] == 1 and trade["money"] == "9.00" and trade["submitted_money"] == "10.00"
    (notify,) = receiver.wait_for("short", 1)
    assert notify.params["money"] == "9.00" and epay.verify(notify.params, KEY)
    assert shop.api("order", out_trade_no="T-SHORT")["money"] == "9.00"
    shop.control("/trades/T-SHORT/pay", {}, status=409)
    shop.control("/trades/NOPE/pay", {}, status=404)
    shop.control("/trades/T-SHORT/pay", {"money": "x"}, status=400)


def test_sim_pay_with_a_per_trade_fault(shop: Merchant, receiver: Receiver) -> None:
    shop.cashier("T-ONE", receiver.url("one"))
    trade = shop.control("/trades/T-ONE/pay", {"pid": "1001", "notify": "drop"})
    assert trade["fault"] == "drop" and trade["notify_state"] == "dropped"
    shop.cashier("T-TWO", receiver.url("two"))
    shop.control("/trades/T-TWO/pay", {})
    receiver.wait_for("two", 1)
    assert receiver.got("one") == []


def test_sim_create_trades(shop: Merchant, receiver: Receiver) -> None:
    body = {"pid": "1001", "out_trade_no": "T-GHOST", "money": "3.30", "paid": True}
    created = shop.control("/trades", {**body, "notify_url": receiver.url("ghost")})
    assert created["status"] == 1 and created["origin"] == "control"
    (notify,) = receiver.wait_for("ghost", 1)
    assert notify.params["out_trade_no"] == "T-GHOST" and epay.verify(notify.params, KEY)
    shop.control("/trades", body, status=409)

    unpaid = shop.control("/trades", {"out_trade_no": "T-UNPAID", "money": "1.00"})
    assert unpaid["status"] == 0 and unpaid["pid"] == "1001"
    quiet = shop.control("/trades", {"out_trade_no": "T-QUIET", "money": "1.00", "paid": True})
    assert quiet["notify_state"] == "none"
    shop.control("/trades/T-QUIET/notify", status=409)
    shop.control("/trades", {"out_trade_no": "T-X", "money": "1"} | {"type": "x"}, status=400)
    shop.control("/trades", {"out_trade_no": "T-X", "money": "1", "pid": "404"}, status=400)


def test_mutate_changes_what_the_query_reports(shop: Merchant, receiver: Receiver) -> None:
    shop.control("/trades", {"out_trade_no": "T-MUT", "money": "8.00", "paid": True})
    shop.control("/trades/T-MUT/mutate", {"money": "7.50"})
    order = shop.api("order", out_trade_no="T-MUT")
    assert order["money"] == "7.50" and order["status"] == 1
    shop.control("/trades/T-MUT/mutate", {"status": 0})
    order = shop.api("order", out_trade_no="T-MUT")
    assert order["status"] == 0 and order["endtime"] is None
    shop.control("/trades/T-MUT/mutate", {"status": 2}, status=400)
    shop.control("/trades/NOPE/mutate", {"status": 1}, status=404)
    assert shop.trade("T-MUT")["notify_attempts"] == []


def test_config_validation_and_state_hides_keys(shop: Merchant) -> None:
    shop.control("/config", {"notify": "sometimes"}, status=400)
    shop.control("/config", {"duplicate_count": -1}, status=400)
    shop.control("/config", {"notify_retry_s": []}, status=400)
    shop.control("/config", {"colour": "red"}, status=400)
    config = shop.control("/config", {"notify_retry_s": [0, 1.5]})
    assert config == {
        "notify": "normal",
        "notify_delay_s": 0.0,
        "duplicate_count": 1,
        "notify_retry_s": [0.0, 1.5],
    }
    state = shop.http.get("/_sim/state")
    assert state.json()["merchants"] == [
        {"pid": "1001", "currency": "CNY"},
        {"pid": "1002", "currency": "CNY"},
    ]
    assert KEY not in state.text and OTHER_KEY not in state.text


# -- merchant API --------------------------------------------------------------------------------


def test_api_refusals(shop: Merchant) -> None:
    shop.control("/trades", {"out_trade_no": "T-API", "money": "1.00"})
    assert shop.api("order", key="wrong", out_trade_no="T-API") == {
        "code": -1,
        "msg": "KEY校验失败",
    }
    assert shop.api("order", pid="9999", out_trade_no="T-API")["msg"] == "KEY校验失败"
    assert shop.api("order", out_trade_no="NOPE") == {"code": -1, "msg": "订单号不存在"}
    assert shop.api("order")["code"] == -1
    # Another merchant's trade does not exist for this one.
    other = shop.api("order", pid="1002", key=OTHER_KEY, out_trade_no="T-API")
    assert other["msg"] == "订单号不存在"
    missing = shop.http.get("/api.php", params={"act": "order", "out_trade_no": "T-API"})
    assert missing.status_code == 200 and missing.json()["code"] == -1
    assert shop.http.get("/api.php", params={"act": "nope"}).json()["code"] == -1
    posted = shop.http.post(
        "/api.php", data={"act": "order", "pid": "1001", "key": KEY, "out_trade_no": "T-API"}
    )
    assert posted.json()["code"] == 1


def test_orders_lists_newest_first(shop: Merchant) -> None:
    for n in range(4):
        shop.control("/trades", {"out_trade_no": f"T-L{n}", "money": "1.00", "paid": n % 2 == 0})
    shop.control("/trades", {"pid": "1002", "out_trade_no": "T-OTHER", "money": "1.00"})
    listed = shop.api("orders")
    assert listed["code"] == 1
    assert [o["out_trade_no"] for o in listed["data"]] == ["T-L3", "T-L2", "T-L1", "T-L0"]
    page = shop.api("orders", limit="2", offset="1")["data"]
    assert [o["out_trade_no"] for o in page] == ["T-L2", "T-L1"]
    paid = shop.api("orders", status="1")["data"]
    assert [o["out_trade_no"] for o in paid] == ["T-L2", "T-L0"]
    assert set(paid[0]) >= {"trade_no", "api_trade_no", "addtime", "endtime", "money", "status"}
    assert len(shop.api("orders", limit="500")["data"]) == 4  # capped at 50, like EPay
    assert shop.api("orders", limit="0")["code"] == -1
    assert shop.api("orders", offset="-1")["code"] == -1
    assert shop.api("orders", status="7")["code"] == -1


def test_refund_rules(shop: Merchant) -> None:
    shop.control("/trades", {"out_trade_no": "T-REF", "money": "10.00"})
    assert shop.api("refund", out_trade_no="T-REF", money="1.00")["code"] == -1  # unpaid
    shop.control("/trades/T-REF/pay", {})
    assert shop.api("refund", out_trade_no="T-REF", money="10.01")["code"] == -1
    assert shop.api("refund", out_trade_no="T-REF", money="abc")["code"] == -1
    assert shop.api("refund", out_trade_no="T-REF", money="0")["code"] == -1
    assert shop.api("refund", out_trade_no="T-REF", money="4.00") == {"code": 1, "msg": "退款成功"}
    assert shop.api("refund", out_trade_no="T-REF", money="6.01")["code"] == -1
    assert shop.api("refund", out_trade_no="T-REF", money="6.00")["code"] == 1
    assert shop.api("refund", out_trade_no="T-REF", money="0.01")["code"] == -1
    assert shop.api("refund", key="wrong", out_trade_no="T-REF", money="1")["msg"] == "KEY校验失败"
    assert shop.api("refund", out_trade_no="NOPE", money="1")["msg"] == "订单号不存在"
    assert shop.trade("T-REF")["refunded_money"] == "10.00"


# -- the Python handle and the command -----------------------------------------------------------


def test_handle_defaults_and_state() -> None:
    with start_gateway_sim() as g:
        assert (g.pid, g.key) == ("1001", "demo-epay-key")
        fields = epay.signed(
            {
                "pid": g.pid,
                "type": "wxpay",
                "out_trade_no": "H-1",
                "notify_url": "http://127.0.0.1:9/n",
                "name": "x",
                "money": "1",
            },
            g.key,
        )
        reply = httpx.post(f"{g.url}/submit.php", data=fields, trust_env=False)
        assert reply.status_code == 200
        trade = g.state.find("1001", "H-1")
        assert trade is not None and trade.money_cents == 100 and trade.status == 0
        assert g.state.config.retry_s == [0, 15, 60, 300, 900, 1800, 3600]


def test_cli_command() -> None:
    import kameng.cli.gateway_sim  # noqa: F401  (registers the command)
    from kameng.cli.base import app

    runner = CliRunner()
    assert runner.invoke(app, ["gateway-sim", "--help"]).exit_code == 0
    assert runner.invoke(app, ["gateway-sim", "--merchant", "nokey"]).exit_code == 2
    assert runner.invoke(app, ["gateway-sim", "--notify-retry", "a,b"]).exit_code == 2
    assert runner.invoke(app, ["gateway-sim", "--currency", "yuan"]).exit_code == 2

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = "import kameng.cli.gateway_sim; from kameng.cli.base import app; app()"
    args = ["gateway-sim", "--port", str(port), "--merchant", "2002:a-long-secret-key"]
    args += ["--merchant", "2003:another-secret-key", "--notify-retry", "0,0.5"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        state: dict[str, Any] = {}

        def up() -> bool:
            nonlocal state
            try:
                state = httpx.get(f"http://127.0.0.1:{port}/_sim/state", trust_env=False).json()
            except httpx.TransportError:
                return False
            return True

        wait_until(up, timeout=20)
        assert [m["pid"] for m in state["merchants"]] == ["2002", "2003"]
        assert state["config"]["notify_retry_s"] == [0, 0.5]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert f"http://127.0.0.1:{port}" in out and "2002" in out and "2003" in out
    assert "a-long-secret-key" not in out and "another-secret-key" not in out
