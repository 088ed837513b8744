"""`wsclip review OUT_DIR`: a local web page to check a labelled folder, worst masks first.

The page (wsclip/serve/static/review.html + review.js, no build step) lives under /review/; it
holds no data. Its JSON and PNG endpoints live under /review/api/ and follow the server's token
rule (wsclip.serve.server.token_error: with a token, `Authorization: Bearer <token>`; the page
takes the token from the URL fragment, `/review/#token=...`, which browsers never send to a server):

    GET  /review/api/meta            classes, their colours, whether ground truth is given, mark counts
    GET  /review/api/images          every image: id, quality score and signals, mIoU, classes, mark
    GET  /review/api/image?id=       one image: quality, per-class IoU by name, which CAMs exist
    GET  /review/api/photo?id=       the photo (PNG)
    GET  /review/api/overlay?id=     the mask over the photo (PNG; VOC palette as the legend)
    GET  /review/api/cam?id=&k=      class k's CAM heatmap over the photo (PNG; runs with --cams)
    POST /review/api/mark            {"id": ..., "status": "accepted" | "rejected" | null} (JSON only,
                                     so another web site cannot post marks without a CORS preflight)

Marks go to OUT_DIR/review.json atomically (wsclip.serve.folder); the exports honour them.
`wsclip serve --review OUT_DIR` mounts the same app under /review.
"""

import json  # no `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime
from pathlib import Path

from wsclip.errors import WsclipError, require

__all__ = ["STATIC", "review_app", "standalone_app", "serve_review"]

STATIC = Path(__file__).with_name("static")
_PAGES = {"": ("review.html", "text/html; charset=utf-8"), "review.js": ("review.js", "text/javascript"),
          "review.css": ("review.css", "text/css")}


def _classes_of(rec: dict) -> list[int]:
    """0-based classes an image is labelled with (the record's 1-based label_ids, else the quality entry's areas)."""
    if rec.get("label_ids") is not None:
        return [int(k) - 1 for k in rec["label_ids"]]
    return sorted(int(k) for k in ((rec.get("quality") or {}).get("area") or {}))


def review_app(folder):
    """The FastAPI app of the review page for a LabeledFolder (mount it at /review)."""
    require("fastapi", "serve", "wsclip review")
    from anyio import to_thread
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    from wsclip.eval.viz import cam_heatmap, encode_png, overlay
    from wsclip.io import voc_palette
    from wsclip.serve.folder import STATUSES

    app = FastAPI(title="wsclip review", docs_url=None, redoc_url=None, openapi_url=None)
    pal = voc_palette()

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(WsclipError)
    async def _user_error(request, exc: WsclipError):
        return error(404 if isinstance(exc, FileNotFoundError) else 422, str(exc))

    def png(data: bytes) -> Response:
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/")
    @app.get("/{name}")
    async def page(name: str = ""):
        if name not in _PAGES:
            return error(404, f"no page '{name}'")
        file, media = _PAGES[name]
        return Response((STATIC / file).read_bytes(), media_type=media, headers={"Cache-Control": "no-store"})

    @app.get("/api/meta")
    async def meta():
        classes = folder.classes
        marks = folder.marks()
        colours = ["#%02x%02x%02x" % tuple(pal[3 * v: 3 * v + 3]) for v in range(len(classes) + 1)]
        return {"root": str(folder.root), "classes": ["background", *classes], "colours": colours,
                "ignore_colour": "#%02x%02x%02x" % tuple(pal[765:768]), "has_gt": folder.gt is not None,
                "images": len(folder.ids), "accepted": sum(v == "accepted" for v in marks.values()),
                "rejected": sum(v == "rejected" for v in marks.values())}

    def listing() -> list[dict]:
        marks = folder.marks()
        out = []
        for i in folder.ids:
            q = folder.quality(i) if folder.gt is not None else (folder.records[i].get("quality") or {})
            out.append({"id": i, "score": q.get("score"), "miou": q.get("miou"), "classes": _classes_of(folder.records[i]),
                        "mark": marks.get(i)})
        return out

    @app.get("/api/images")
    async def images():
        return {"images": await to_thread.run_sync(listing)}

    @app.get("/api/image")
    async def image(id: str):
        def detail():
            q = folder.quality(id)
            names = ["background", *folder.classes]
            iou = {names[int(v)] if int(v) < len(names) else v: x for v, x in (q.pop("iou", None) or {}).items()}
            cams = folder.cams(id)
            return {"id": id, "quality": q, "iou": iou or None, "mark": folder.marks().get(id),
                    "classes": _classes_of(folder.records[id]),
                    "cams": [int(k) for k in cams[0]] if cams is not None else [],
                    "size": list(folder.mask(id).shape)}

        return await to_thread.run_sync(detail)

    @app.get("/api/photo")
    async def photo(id: str):
        return png(await to_thread.run_sync(lambda: encode_png(folder.image(id))))

    @app.get("/api/overlay")
    async def mask_overlay(id: str):
        return png(await to_thread.run_sync(lambda: encode_png(overlay(folder.image(id), folder.mask(id), alpha=0.6))))

    @app.get("/api/cam")
    async def cam(id: str, k: int):
        def draw():
            cams = folder.cams(id)
            if cams is None:
                raise WsclipError(f"no CAMs stored for '{id}' (label with --cams to see them)")
            keys = [int(v) for v in cams[0]]
            if k not in keys:
                raise WsclipError(f"'{id}' has no CAM of class {k} (it has {keys})")
            return encode_png(cam_heatmap(folder.image(id), cams[1][keys.index(k)]))

        return png(await to_thread.run_sync(draw))

    @app.post("/api/mark")
    async def mark(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return error(415, "send the mark as application/json")
        try:
            body = json.loads(await request.body())
            image_id, status = str(body["id"]), body.get("status")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            return error(422, 'send {"id": ..., "status": "accepted" | "rejected" | null}')
        if status is not None and status not in STATUSES:
            return error(422, f"status must be one of {', '.join(STATUSES)} or null")
        marks = await to_thread.run_sync(folder.set_mark, image_id, status)
        return {"id": image_id, "mark": marks.get(image_id), "accepted": sum(v == "accepted" for v in marks.values()),
                "rejected": sum(v == "rejected" for v in marks.values())}

    return app


def standalone_app(folder, token: str | None = None):
    """An ASGI app serving only the review page at /review (/ redirects there), with the token rule."""
    from fastapi import FastAPI
    from fastapi.responses import RedirectResponse

    from wsclip.serve.server import _send_error, token_error

    root = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    root.mount("/review", review_app(folder))

    @root.get("/")
    async def home():
        return RedirectResponse("/review/")

    async def guarded(scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            err = token_error(token, scope.get("path", ""), headers)
            if err is not None:
                return await _send_error(send, err)
        return await root(scope, receive, send)

    return guarded


def serve_review(folder, host: str = "127.0.0.1", port: int = 8000, token: str | None = None) -> int:
    """Run the review page in the foreground until Ctrl-C; prints its address first."""
    uvicorn = require("uvicorn", "serve", "wsclip review")
    from wsclip.serve.server import bind_socket

    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        print(f"wsclip review: warning: listening on {host} without a token: anyone who reaches it can mark images",
              flush=True)
    sock = bind_socket(host, port)
    url = f"http://{host}:{sock.getsockname()[1]}/review/" + (f"#token={token}" if token else "")
    print(f"wsclip review: {len(folder.ids)} images of {folder.root}; open {url}", flush=True)
    server = uvicorn.Server(uvicorn.Config(standalone_app(folder, token), log_level="warning", access_log=False,
                                          lifespan="off"))
    server.run(sockets=[sock])
    return 0
