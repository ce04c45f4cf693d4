"""Inbound supplier callbacks (`POST /api/v1/callbacks/suppliers/{code}`).

No API-key signature here: the supplier signs with the webhook scheme, checked by its adapter.
The answer is a small JSON with a stable code, so a supplier's logs say why we refused.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from kameng.pipeline import callbacks

router = APIRouter(prefix="/api/v1/callbacks", include_in_schema=False)

MAX_BODY = 256 * 1024


@router.post("/suppliers/{supplier_code}")
async def supplier_callback(supplier_code: str, request: Request) -> JSONResponse:
    body = await request.body()
    if len(body) > MAX_BODY:
        return JSONResponse({"status": "refused", "code": "too_large"}, status_code=413)
    answer = await callbacks.receive(
        request.app.state.container,
        request.app.state.adapters,
        supplier_code=supplier_code[:64],
        headers=dict(request.headers),
        body=body,
    )
    return JSONResponse(answer.body, status_code=answer.status_code)
