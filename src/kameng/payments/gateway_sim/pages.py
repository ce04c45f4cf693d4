"""The buyer-facing HTML of the simulated gateway: cashier, error and result pages.

Real EPay answers a bad submit with an error page rather than JSON, and the buyer pays on a
cashier page; the demo and browser tests click through these the same way. The pages are
self-contained (inline style, no scripts, no external assets) and every value is escaped, since
names and URLs come from the merchant's request.
"""

from __future__ import annotations

from html import escape

from starlette.responses import HTMLResponse

from kameng.payments.gateway_sim.state import Trade
from kameng.security.epay import format_money

TYPE_LABELS = {
    "alipay": "支付宝 Alipay",
    "wxpay": "微信支付 WeChat Pay",
    "qqpay": "QQ钱包 QQ Wallet",
}

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:34rem;margin:2rem auto;padding:0 1rem;"
    "color:#222}h1{font-size:1.3rem}table{border-collapse:collapse;width:100%;margin:1rem 0}"
    "th,td{text-align:left;padding:.4rem;border-bottom:1px solid #ddd}th{width:40%;color:#555}"
    ".money{font-size:1.6rem;color:#c00}.msg{padding:1rem;border-radius:4px;background:#f4f4f4}"
    ".error{background:#fdecea}button{font-size:1rem;padding:.5rem 1.5rem;cursor:pointer}"
    "a{margin-left:1rem}footer{margin-top:2rem;font-size:.8rem;color:#888}"
)
# Nothing to load and nothing to run: the pages need neither.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


def page(title: str, body: str, *, status: int = 200) -> HTMLResponse:
    html = (
        '<!doctype html><html lang="zh-CN"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>{body}"
        "<footer>kameng EPay 模拟网关 · simulated EPay gateway</footer></body></html>"
    )
    return HTMLResponse(html, status_code=status, headers=_HEADERS)


def error_page(zh: str, en: str, *, status: int = 400) -> HTMLResponse:
    body = (
        "<h1>支付失败 Payment error</h1>"
        f'<p class="msg error" id="error"><span lang="zh-CN">{escape(zh)}</span><br>'
        f'<span lang="en">{escape(en)}</span></p>'
    )
    return page(f"{zh} / {en}", body, status=status)


def _details(trade: Trade) -> str:
    rows = (
        ("商品名称 Item", escape(trade.name)),
        ("订单号 Order no.", escape(trade.out_trade_no)),
        ("交易号 Trade no.", escape(trade.trade_no)),
        ("支付方式 Method", escape(TYPE_LABELS.get(trade.type, trade.type))),
        (
            "金额 Amount",
            f'<span class="money" id="money">¥{format_money(trade.money_cents)}</span>'
            + (f" {escape(trade.currency)}" if trade.currency else ""),
        ),
    )
    cells = "".join(f"<tr><th>{label}</th><td>{value}</td></tr>" for label, value in rows)
    return f"<table>{cells}</table>"


def cashier_page(trade: Trade) -> HTMLResponse:
    site = f" · {escape(trade.sitename)}" if trade.sitename else ""
    cancel = (
        f'<a id="cancel" href="{escape(trade.return_url)}">取消支付 Cancel</a>'
        if trade.return_url
        else ""
    )
    body = (
        f"<h1>收银台 Checkout{site}</h1>{_details(trade)}"
        f'<form method="post" action="/pay/{escape(trade.trade_no)}">'
        f'<button id="pay" type="submit">确认支付 Pay</button>{cancel}</form>'
    )
    return page("收银台 Checkout", body)


def paid_page(trade: Trade, return_link: str | None, *, already: bool) -> HTMLResponse:
    """The result page: after paying without a return_url, or a submit of a paid order."""
    title = "该订单已支付 / already paid" if already else "支付成功 / paid"
    link = (
        f'<p><a id="return" href="{escape(return_link)}">返回商户 Back to the shop</a></p>'
        if return_link
        else ""
    )
    body = f'<h1 id="result">{escape(title)}</h1>{_details(trade)}{link}'
    return page(title, body)
