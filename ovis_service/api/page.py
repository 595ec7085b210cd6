"""The playground page at `/` and its assets under `/static/`: public, like `/health`.

Everything the page needs is served from `ovis_service/static/`, and its Content-Security-Policy
lets the browser fetch nothing from anywhere else, so it works on an offline GPU box.
"""

from pathlib import Path

from litestar import MediaType, Response, Router, get
from litestar.datastructures import CacheControlHeader
from litestar.static_files import create_static_files_router

from ovis_service.api.common import utf8_scripts
from ovis_service.auth import PUBLIC

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
PAGE_FILE = STATIC_DIR / "page.html"

# blob: holds the generated image, data: the empty favicon (which spares a 404 per visit).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# Revalidate every time: a restarted service with a new page never shows a stale one.
_REVALIDATE = CacheControlHeader(no_cache=True)


@get(
    "/",
    opt={PUBLIC: True},
    include_in_schema=False,
    media_type=MediaType.HTML,
    cache_control=_REVALIDATE,
    sync_to_thread=True,
)
def page() -> Response[bytes]:
    """The page is a few kilobytes; reading it per request lets `--reload` pick up edits."""
    return Response(PAGE_FILE.read_bytes(), headers=SECURITY_HEADERS)


static_router = create_static_files_router(
    path="/static",
    directories=[STATIC_DIR],
    opt={PUBLIC: True},
    after_request=utf8_scripts,
    cache_control=_REVALIDATE,
    name="playground_static",
)

page_router = Router(path="/", route_handlers=[page, static_router])
