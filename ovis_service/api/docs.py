"""API docs that work offline: Swagger UI 5 from a package that ships it, not from a CDN.

`/schema` and `/schema/swagger` render the UI; its script and style come from `/docs/assets/`,
served out of the `litestar-offline-docs` package. `/docs` leads there and `/openapi.json`
serves the schema, where users of other frameworks look first. The pages need the API key when
one is set, like the schema itself; the assets are the package's public files and do not.
"""

from pathlib import Path
from typing import Any

import litestar_offline_docs
from litestar import Request, Response, Router, get
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.response import Redirect
from litestar.static_files import create_static_files_router

from ovis_service.api.common import utf8_scripts
from ovis_service.auth import PUBLIC

ASSETS_PATH = "/docs/assets"
ASSETS_DIR = Path(litestar_offline_docs.__file__).resolve().parent / "static"
SCHEMA_PATH = "/schema"  # Litestar's OpenAPI router, where the rendered pages live
UI_PATH = f"{SCHEMA_PATH}/swagger"
OPENAPI_MEDIA_TYPE = "application/vnd.oai.openapi+json"
# An empty icon: the browser asks for one, and the default would be fetched from a CDN.
_NO_FAVICON = "<link rel='icon' href='data:,'>"


def swagger_ui() -> SwaggerRenderPlugin:
    """The render plugin for `/schema` and `/schema/swagger`, pointing at our own assets."""
    return SwaggerRenderPlugin(
        path=["/", "/swagger"],
        js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
        css_url=f"{ASSETS_PATH}/swagger-ui.css",
        standalone_preset_js_url=f"{ASSETS_PATH}/swagger-ui-standalone-preset.js",
        favicon=_NO_FAVICON,
    )


@get("/docs", include_in_schema=False)
async def docs() -> Redirect:
    return Redirect(UI_PATH)


@get("/openapi.json", include_in_schema=False, media_type=OPENAPI_MEDIA_TYPE)
async def openapi_json(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    return Response(request.app.openapi_schema.to_schema(), media_type=OPENAPI_MEDIA_TYPE)


assets_router = create_static_files_router(
    path=ASSETS_PATH,
    directories=[ASSETS_DIR],
    opt={PUBLIC: True},
    after_request=utf8_scripts,
    include_in_schema=False,
    name="docs_assets",
)

docs_router = Router(path="/", route_handlers=[docs, openapi_json, assets_router])
