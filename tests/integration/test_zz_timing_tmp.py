import time, random
from tests.integration import test_oversell_pg as t
def test_t(pg_container, monkeypatch):
    t0=time.monotonic()
    sku, creds, plan = t._setup(pg_container, random.Random(1))
    t1=time.monotonic()
    print("setup", t1-t0)
