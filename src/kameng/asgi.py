"""ASGI entry point for uvicorn (`kameng.asgi:app`); each process builds its own container."""

import sys

from kameng.app import create_app

# SQLite calls release the GIL; with the default 5 ms switch interval a thread that holds the
# database write lock waits behind busy request threads to get the GIL back after every
# statement (a lock convoy). A shorter interval keeps the write lock's hold time short.
sys.setswitchinterval(0.0005)

app = create_app()
