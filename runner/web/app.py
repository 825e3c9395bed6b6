"""`forge serve`: the registry as read-only web pages (Starlette + Jinja2).

    GET  /                    every model version as a table (rejected ones too): family,
                              state, dataset, primary metric, delta against its comparator,
                              cost, date; sorted on the server (?sort=metric&order=desc);
                              then the families: latest version, champion(s), candidates
    GET  /datasets            every dataset: citation, cells and genes, label key, the
                              versions trained on it
    GET  /artifacts/{id}      one version: lineage tree, metrics vs parent and baseline,
                              per-class F1 and confusion matrix, cost, code, dataset citation,
                              gate decision, MLflow links (a dataset: its citation)
    GET  /artifacts/{id}/confusion_matrix.png   the run's figure, through the host's MLflow client
    GET  /benchmarks          every benchmark: dataset, task, metric, versions, the best
    GET  /benchmarks/{id}     its leaderboard: every version of every family measured on it
    GET  /tools               the registered skills and the dry-run form
    POST /tools/dry-run       train_model_version(..., dry_run=True) on the form's fields;
    GET  /tools/dry-run?...   the same, read from the query (a page a browser can load)

Nothing here writes but the dry run's own audit row, under the page's name (`web`), never
the named agent's; the agent's balance is shown only with the operator's --show-balances.
Every page is plain HTML and CSS (no JavaScript), served under a Content-Security-Policy of
'self' only; Jinja2 escapes every value. A typed error is a page with its reason, field and
fix (400 for a malformed dry run or sort, 404 for an unknown or invalid id), never a
traceback.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from runner import settings
from runner.config.compose import compose_resolved
from runner.errors import ForgeError, InvalidInput
from runner.registry import db
from runner.web import listings, pages

HERE = Path(__file__).resolve().parent
log = logging.getLogger(__name__)

SECURITY_HEADERS = {
    # No script at all, nothing from elsewhere, never framed, forms post only back here.
    "Content-Security-Policy": "default-src 'self'; script-src 'none'; object-src 'none'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # links out to MLflow carry no page address
}


class SecurityHeaders:
    """Pure ASGI middleware: SECURITY_HEADERS on every response, static files included."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(segment=pages.segment, http_url=pages.http_url,
                       pretty=lambda value: json.dumps(value, indent=2, default=str))
    return Jinja2Templates(env=env)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


def create_app(db_url: str | None = None, *, hosts: tuple[str, ...] = LOOPBACK_HOSTS,
               show_balances: bool = False) -> Starlette:
    """The app over the registry at `db_url` (default: FORGE_DB_URL, else FORGE_HOME's). A dry
    run composes the operator's config like every call, so it uses the configured registry:
    `forge serve --db-url` sets FORGE_DB_URL, so that both are the same. Only requests whose
    Host is one of `hosts` are served (400 otherwise): a page whose name was rebound to
    127.0.0.1 cannot read the registry through a visitor's browser. The pages have no login:
    a dry run shows the named agent's balance only with `show_balances` (the operator's
    `forge serve --show-balances`)."""
    url = db_url or settings.db_url()
    templates = _templates()

    @functools.cache
    def tracking() -> dict:
        """The operator's tracking config (conf/ tracking group): the store, the UI's URLs."""
        return compose_resolved(writable=False)[1]["tracking"]

    def render(request: Request, name: str, context: dict, status: int = 200) -> Response:
        return templates.TemplateResponse(request, name, context, status_code=status)

    def failed(request: Request, exc: ForgeError, status: int) -> Response:
        if isinstance(exc, db.DatabaseError):  # the registry is away, not the page
            status = 503
        return render(request, "error.html", {"error": exc.to_dict(), "status": status}, status)

    def read(request: Request, name: str, build) -> Response:
        """Render `name` from `build(conn)`, in one registry transaction."""
        try:
            with db.transaction(url=url) as conn:
                context = build(conn)
        except ForgeError as exc:  # InvalidArtifactId, NotFound: no such page
            return failed(request, exc, 404)
        except Exception as exc:
            typed = db.unavailable(exc)
            if typed is None:
                raise
            return failed(request, typed, 503)
        return render(request, name, context)

    # Sync endpoints: Starlette runs them in its thread pool (the registry calls block).
    def index(request: Request) -> Response:
        try:  # caller input: only the whitelisted keys and orders, a page number
            sort, order = listings.sort_request(request.query_params.get("sort"),
                                                request.query_params.get("order"))
            page = listings.page_request(request.query_params.get("page"))
        except ForgeError as exc:
            return failed(request, exc, 400)

        def build(c) -> dict:
            per_page = listings.PER_PAGE
            rows, total = listings.version_rows(c, sort, order, page, per_page)
            return {"rows": rows, "sort": sort, "order": order, "page": page, "total": total,
                    "pages": max(1, -(-total // per_page)),
                    "families": pages.families(c)}
        return read(request, "index.html", build)

    def datasets(request: Request) -> Response:
        return read(request, "datasets.html", lambda c: {"datasets": listings.datasets(c)})

    def artifact(request: Request) -> Response:
        artifact_id, store = request.path_params["artifact_id"], tracking()
        return read(request, "artifact.html", lambda c: pages.artifact(artifact_id, c, store))

    def confusion_matrix(request: Request) -> Response:
        artifact_id, store = request.path_params["artifact_id"], tracking()
        try:
            with db.transaction(url=url) as conn:
                run_id = pages.confusion_run(artifact_id, conn, store)
        except ForgeError as exc:
            return failed(request, exc, 404)
        # MLflow is read after the registry's transaction: it takes seconds, the registry none
        png = pages.confusion_png(run_id, store) if run_id else None
        if png is None:
            raise HTTPException(404, "this version has no confusion matrix in the store")
        return Response(png, media_type="image/png")

    def benchmark_index(request: Request) -> Response:
        return read(request, "benchmarks.html", lambda c: {"benchmarks": pages.benchmarks(c)})

    def benchmark(request: Request) -> Response:
        bench_id = request.path_params["benchmark_id"]
        return read(request, "benchmark.html", lambda c: pages.benchmark(bench_id, c))

    def tools(request: Request) -> Response:
        return read(request, "tools.html", lambda c: {
            "skills": pages.skills(c), "values": {}, "form": pages.tools_form(c)})

    def tools_form() -> dict:
        """The dry-run form again, offering the registry's ids (typed ones if it is away)."""
        try:
            with db.transaction(url=url) as conn:
                return pages.tools_form(conn)
        except Exception:  # noqa: BLE001 - the form works without the ids to pick from
            return pages.tools_form(None)

    async def dry_run(request: Request) -> Response:
        if request.method == "POST":
            async with request.form(max_files=0, max_fields=len(pages.form_fields())) as form:
                fields = list(form.multi_items())
        else:
            fields = list(request.query_params.multi_items())
            if not fields:
                return RedirectResponse("/tools", status_code=303)
        values = {}
        try:
            for name, value in fields:
                if isinstance(value, UploadFile) or name in values:
                    raise InvalidInput(f"{name} must be given once, as text", field=name,
                                       fix="submit the dry-run form as it is")
                values[name] = value
            result = await run_in_threadpool(pages.dry_run, values,
                                             show_balances=show_balances)
        except ForgeError as exc:  # malformed input: its reason, field and fix
            status = 503 if isinstance(exc, db.DatabaseError) else 400
            return render(request, "dry_run.html",
                          {"error": exc.to_dict(), "values": values,
                           "form": await run_in_threadpool(tools_form)}, status)
        return render(request, "dry_run.html", {"result": result, "values": values,
                                                "form": await run_in_threadpool(tools_form)})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return render(request, "error.html",
                      {"error": {"message": exc.detail}, "status": exc.status_code},
                      exc.status_code)

    async def crash(request: Request, exc: Exception) -> Response:
        # Outside the middleware stack (Starlette's ServerErrorMiddleware): set the headers here.
        log.error("forge serve: %s %s failed", request.method, request.url.path, exc_info=exc)
        return Response("internal error: see the server's log\n", status_code=500,
                        media_type="text/plain", headers=SECURITY_HEADERS)

    return Starlette(
        routes=[Route("/", index),
                Route("/datasets", datasets),
                Route("/artifacts/{artifact_id}", artifact),
                Route("/artifacts/{artifact_id}/confusion_matrix.png", confusion_matrix),
                Route("/benchmarks", benchmark_index),
                Route("/benchmarks/{benchmark_id}", benchmark),
                Route("/tools", tools),
                Route("/tools/dry-run", dry_run, methods=["GET", "POST"]),
                Mount("/static", StaticFiles(directory=HERE / "static"), name="static")],
        middleware=[Middleware(SecurityHeaders),
                    Middleware(TrustedHostMiddleware, allowed_hosts=list(hosts))],
        exception_handlers={HTTPException: http_error, Exception: crash})

