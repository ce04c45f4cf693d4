"""ASGI entry point for uvicorn (`kameng.asgi:app`); each process builds its own container."""

from kameng.app import create_app

app = create_app()
