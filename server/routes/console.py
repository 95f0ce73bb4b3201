"""The web console: one static page at `/` and its two asset files, shipped in the package.

The page holds no data (everything it shows comes from the public API, fetched by the browser with the
key the user enters), so these three paths are open even behind `--api-key`; every API call needs the key.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.exceptions import HTTPException

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
ASSETS = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
# Exact paths the API-key middleware lets through: the page and its assets, nothing else.
PUBLIC_PATHS = frozenset({"/", *(f"/console/{name}" for name in ASSETS)})
# The page loads only its own files; no inline script, nothing from another origin.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"cache-control": "no-cache", "content-security-policy": CSP, "x-content-type-options": "nosniff"}

router = APIRouter(tags=["console"], include_in_schema=False)


@cache
def _read(name: str) -> bytes:
    return (CONSOLE_DIR / name).read_bytes()


@router.get("/")
async def page() -> Response:
    """The console page (HTML, no data in it)."""
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/console/{name}")
async def asset(name: str) -> Response:
    """One of the page's own script or style files; any other name is 404."""
    if name not in ASSETS:
        raise HTTPException(404, "not found")
    return Response(_read(name), media_type=ASSETS[name], headers=HEADERS)
