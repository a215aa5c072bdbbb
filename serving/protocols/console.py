"""The tenant admin's web console at ``/console``: static files over the same ``/v1`` API.

The files are built from ``console/`` (TypeScript, Vite, Chart.js) by ``make console`` and
committed under ``serving/console_static/``, so an installed fedtext serves them with no
Node and no CDN. The page signs in with an admin key that it keeps in the tab's session
storage and sends as ``Authorization: Bearer`` to ``/v1``: the console holds no session,
cookie or privilege of its own, and every action is an ordinary API call.
"""

from __future__ import annotations

import mimetypes
import re
from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse, RedirectResponse

STATIC_DIR = Path(__file__).parent.parent / "console_static"

# Scripts, styles and everything else from this origin only; no inline code (the build
# has none), no framing, no plugins, and no string-to-DOM sinks (Trusted Types).
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "font-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    ]
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}

# Built file names: letters, digits, dots, dashes and underscores; no "..", no hidden files.
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
}

router = APIRouter(tags=["console"], include_in_schema=False)


def _file(path: Path, cache_control: str) -> FileResponse:
    media_type = _MEDIA_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
    return FileResponse(
        path,
        media_type=media_type or "application/octet-stream",
        headers={**SECURITY_HEADERS, "Cache-Control": cache_control},
    )


@router.get("/console", include_in_schema=False)
def console_root() -> RedirectResponse:
    """``/console`` -> ``/console/``, so the page's relative world is the console's."""
    return RedirectResponse("/console/", status_code=status.HTTP_308_PERMANENT_REDIRECT)


@router.get("/console/{path:path}", include_in_schema=False)
def console_file(path: str) -> FileResponse:
    """The page (for ``/console/``) or one of its built files."""
    if path in ("", "index.html"):
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, "The console is not built: run `make console`."
            )
        # Revalidated each time: it names the current build's hashed assets.
        return _file(index, "no-cache")
    parts = path.split("/")
    target = STATIC_DIR.joinpath(*parts)
    if not all(_SEGMENT.match(p) for p in parts) or not target.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such console file.")
    # Hashed names under assets/ never change content; anything else is revalidated.
    immutable = parts[0] == "assets" and len(parts) == 2
    return _file(target, "public, max-age=31536000, immutable" if immutable else "no-cache")
