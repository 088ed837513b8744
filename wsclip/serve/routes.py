"""The HTTP endpoints of the labeling server (FastAPI; imported by `create_app` once the `[serve]` extra
is known to be there). Each handler is thin: it finds the Service in `request.app.state.service`,
decodes the request (http_codec), awaits the Service, and encodes the result (http_codec.render)."""

import asyncio
import threading
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from wsclip.serve.http_codec import (FORMATS, ApiError, check_type, decode_upload, form_or_query, parse_batch_labels,
                                     parse_labels, parse_options, read_body, read_form, render)
from wsclip.serve.service import Service, _Item

LABEL_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                "image": {"type": "string", "format": "binary"},
                "labels": {"type": "string", "description": "class names or 1-based indices, comma-separated"},
                "format": {"type": "string", "enum": list(FORMATS), "default": "png"},
                "refine": {"type": "string", "enum": ["default", "none", "crf"], "default": "default"},
                "method": {"type": "string"}}}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "parameters": [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                   for n in ("labels", "format", "refine", "method")],
    "responses": {"200": {"description": "the mask", "content": {"image/png": {}, "application/json": {}}}},
}
BATCH_BODY = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["images"], "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "labels": {"type": "string", "description": "JSON list, one entry per image (names, indices or null)"},
            "format": {"type": "string", "enum": list(FORMATS), "default": "rle"},
            "refine": {"type": "string", "enum": ["default", "none", "crf"]}}}}}},
}


@asynccontextmanager
async def lifespan(app):
    """Load the model in the background at startup; drain the batcher at shutdown."""
    svc: Service = app.state.service
    threading.Thread(target=svc.load, name="wsclip-load", daemon=True).start()
    yield
    await to_thread.run_sync(svc.close)


async def api_error(request, exc: ApiError):
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


async def http_error(request, exc: StarletteHTTPException):
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def _label_one(svc: Service, data: bytes, labels, crf: bool, fmt: str, for_json: bool = False):
    """Decode, label and render one upload: (body, media type, headers) as http_codec.render gives them."""
    image = await to_thread.run_sync(decode_upload, data, svc.cfg.max_pixels)
    item = _Item(image, labels, crf)
    result = await svc.label(item)
    return await to_thread.run_sync(render, item, result, fmt, svc.labeler.classes, svc.labeler.method, for_json)


async def label(request: Request):
    svc: Service = request.app.state.service
    svc.check_ready()
    ctype = request.headers.get("content-type", "")
    if ctype.lower().startswith("multipart/form-data"):
        form = await read_form(request, 1, svc.cfg.read_timeout_s)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "multipart request without a file field 'image'")
        check_type(upload.content_type, "the 'image' part")
        data = await upload.read()
        get = form_or_query(form, request.query_params)
    else:
        check_type(ctype, "the request body")
        data = await read_body(request, svc.cfg.read_timeout_s)
        get = request.query_params.get
    fmt, crf = parse_options(get, "png", svc.labeler)
    labels = parse_labels(get("labels"), svc.labeler.classes)
    body, media, headers = await _label_one(svc, data, labels, crf, fmt)
    if media == "image/png":
        return Response(body, media_type=media, headers=headers)
    return JSONResponse(body, headers=headers)


async def label_batch(request: Request):
    svc: Service = request.app.state.service
    cfg = svc.cfg
    svc.check_ready()
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError(415, "the batch endpoint takes multipart/form-data with one or more 'images' files")
    form = await read_form(request, cfg.max_batch_items, cfg.read_timeout_s)
    uploads = [u for u in form.getlist("images") if not isinstance(u, str)]
    if not uploads:
        raise ApiError(422, "no 'images' files in the request")
    if len(uploads) > cfg.max_batch_items:
        raise ApiError(413, f"{len(uploads)} images in one request; the limit is {cfg.max_batch_items}")
    get = form_or_query(form, request.query_params)
    fmt, crf = parse_options(get, "rle", svc.labeler)
    per_image = parse_batch_labels(get("labels"), len(uploads))
    if svc.batcher.depth + len(uploads) > cfg.max_queue:
        raise ApiError(429, "server busy; retry later", {"Retry-After": str(cfg.retry_after_s)})

    async def one(upload, lab):
        name = upload.filename or ""
        try:
            check_type(upload.content_type, f"'{name}'")
            y = parse_labels(lab, svc.labeler.classes) if lab is not None else None
            body, _, _ = await _label_one(svc, await upload.read(), y, crf, fmt, for_json=True)
            return {"filename": name, "status": 200, **body}
        except ApiError as exc:
            return {"filename": name, "status": exc.status, "error": exc.message}

    results = await asyncio.gather(*(one(u, lab) for u, lab in zip(uploads, per_image)))
    return JSONResponse({"results": results})


async def live():
    return {"status": "alive"}


async def ready(request: Request):
    svc: Service = request.app.state.service
    busy = svc.busy if svc.ready else None
    if svc.ready and busy is None:
        return {"status": "ready", **svc.labeler.describe(), "queue_depth": svc.batcher.depth}
    if busy is not None:  # cannot take work now: a load balancer should send it elsewhere
        return JSONResponse({"status": "busy", "reason": busy}, status_code=503,
                            headers={"Retry-After": str(svc.cfg.retry_after_s)})
    state = "draining" if svc.draining else ("failed" if svc.error else "loading")
    body = {"status": state, **({"error": svc.error} if svc.error else {})}
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(svc.cfg.retry_after_s)})


async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(request.app.state.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
