"""ASGI entry point for uvicorn (`kameng.asgi:app`); each process builds its own container."""

import gc
import sys

from kameng.app import create_app
from kameng.config import get_settings
from kameng.startup_checks import check_or_exit, public_url

# SQLite calls release the GIL; with the default 5 ms switch interval a thread that holds the
# database write lock waits behind busy request threads to get the GIL back after every
# statement (a lock convoy). A shorter interval keeps the write lock's hold time short.
app = create_app(embedded_worker=get_settings().embedded_worker)
# Whatever starts this app (`kameng serve`, or uvicorn/gunicorn directly), a simulator gateway or
# supplier never serves behind a public address.
check_or_exit(app.state.container, public_url=public_url(get_settings()))
if app.state.container.db.is_sqlite:
    sys.setswitchinterval(0.0005)

# Everything built so far lives as long as the process: keep it out of the cyclic collector,
# and collect young garbage less often. Full collections over a large, stable heap were the
# longest pauses a request could hit (they showed as the slowest percent of orders).
gc.collect()
gc.freeze()
gc.set_threshold(50_000, 20, 100)
