"""Buy a card key from a running kameng with the demo reseller's credentials.

    .venv/bin/python examples/buy.py STEAM-50 [quantity] [field=value ...]
    .venv/bin/python examples/buy.py PHONE-50 1 phone=13800138000

Shows the whole signed-API round trip: product list with your price, an order paid from
balance (delivered at once from stock, or backordered with the money held), the order with
its timeline, and your balance. Orders procured from a supplier are followed until they
settle, so the whole chain can be watched.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

from kameng.apiclient import ResellerClient


def main() -> None:
    sku = sys.argv[1] if len(sys.argv) > 1 else "STEAM-50"
    quantity = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    fields = dict(arg.split("=", 1) for arg in sys.argv[3:] if "=" in arg)
    data_dir = Path(os.environ.get("KAMENG_DATA_DIR", "var"))
    creds = json.loads((data_dir / "demo-credentials.json").read_text())
    base = os.environ.get("KAMENG_URL", "http://127.0.0.1:8000")
    client = ResellerClient(base, creds["api_key"], creds["api_secret"])
    for product in client.products().json()["products"]:
        for s in product["skus"]:
            print(
                f"{s['sku']:<12} {product['name']} · {s['name']:<14} ¥{s['price']:>8}  "
                f"stock={s['stock']}"
            )
    created = client.create_order(
        sku,
        quantity,
        idempotency_key=str(uuid.uuid4()),
        customer_ref=f"demo-{uuid.uuid4().hex[:8]}",
        fields=fields,
    )
    print(f"\nPOST /api/v1/orders -> {created.status_code}")
    print(json.dumps(created.json(), ensure_ascii=False, indent=2))
    if created.status_code == 201:
        order_no = created.json()["order_no"]
        order = client.order(order_no).json()
        deadline = time.monotonic() + 30
        while order["status"] == "fulfilling" and time.monotonic() < deadline:
            print(f"  … {order['status']}/{order['stage']}: {order['reason_text']}")
            time.sleep(1)
            order = client.order(order_no).json()
        print(f"\nnow {order['status']}: {order['reason_text']}")
        if order.get("keys"):
            print("keys:", json.dumps(order["keys"], ensure_ascii=False))
        print("\ntimeline:")
        for event in order["timeline"]:
            print(
                f"  {event['at']}  {event['from_status'] or '-'} -> {event['to_status']}  "
                f"{event['reason_text']}"
            )
    print("\nbalance:", client.balance().json())


if __name__ == "__main__":
    main()
