"""Server-rendered pages. For now: the home page (catalog with live stock) and order lookup."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from kameng.catalog import service as catalog
from kameng.errors import normalize_language
from kameng.inventory import service as inventory
from kameng.money import format_cents

if TYPE_CHECKING:
    from kameng.container import Container

router = APIRouter(include_in_schema=False)
_env = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
)

TEXT = {
    "zh-CN": {
        "title": "卡盟 · 商品与查单",
        "tagline": "每一笔订单都说清楚：在哪、为什么、下一步何时发生。",
        "products": "商品",
        "stock": "库存",
        "price": "零售价",
        "lookup": "查单",
        "order_no": "订单号",
        "secret": "查询密码",
        "submit": "查询",
        "api": "代理商 API 文档",
        "unlimited": "上游供货",
    },
    "en": {
        "title": "kameng · catalog and order lookup",
        "tagline": "Every order says where it is, why, and when the next step happens.",
        "products": "Products",
        "stock": "Stock",
        "price": "Retail price",
        "lookup": "Look up an order",
        "order_no": "Order number",
        "secret": "Lookup secret",
        "submit": "Look up",
        "api": "Reseller API docs",
        "unlimited": "supplied upstream",
    },
}


def home(request: Request, container: Container) -> Response:
    lang = request.query_params.get("lang") or normalize_language(
        request.headers.get("accept-language")
    )
    lang = "en" if lang.startswith("en") else "zh-CN"
    with container.db.connect(write=False) as conn:
        counts = inventory.available_counts(conn)
    with container.db.unit_of_work(write=False) as session:
        products = [
            {
                "name": p.name,
                "category": p.category.name,
                "kind": p.delivery_kind,
                "skus": [
                    {
                        "code": s.code,
                        "name": s.name,
                        "price": format_cents(s.price_cents),
                        "stock": counts.get(s.id, 0) if p.delivery_kind == "card_key" else None,
                    }
                    for s in p.skus
                    if s.enabled
                ],
            }
            for p in catalog.list_products(session)
        ]
    html = _env.get_template("home.html").render(t=TEXT[lang], lang=lang, products=products)
    return HTMLResponse(html)
