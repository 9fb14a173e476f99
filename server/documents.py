"""Written documents (upgrade plans, commissioning plans and reports) as HTML and PDF.

The service terms promise *written* plans and reports, so each one is rendered once from a
Jinja2 template under `server/templates/documents/` into HTML (what the API and the
dashboard show) and a PDF of the same text (what a customer files or signs). The PDF comes
from fpdf2, a pure-Python library, so no system libraries are needed: it reads the HTML's
`<body>` through fpdf2's HTML subset (headings, paragraphs, lists, tables, b/i/u, code), which
is why the templates keep to that subset and put their styling in `<head>` only.

A template may have a Markdown twin (`<name>.md`, e.g. for tickets and mails); if present it is
rendered with the same context into `Document.markdown`.

Fonts: text within Latin-1 (most plans) uses the PDF core font Helvetica, which costs nothing.
Text beyond it embeds DejaVu Sans when the machine has it (Debian/Ubuntu `fonts-dejavu-core`,
most Linux desktops), at about a second per PDF; without DejaVu the few characters outside
Latin-1 are transliterated.
"""

from __future__ import annotations

import asyncio
import html
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from fpdf import FPDF
from fpdf.errors import FPDFException
from fpdf.fonts import FontFace, TextStyle

from server.errors import InvalidInput, ServerError

TEMPLATE_DIR = Path(__file__).parent / "templates" / "documents"

FONT_DIRS = (
    Path("/usr/share/fonts/truetype/dejavu"),
    Path("/usr/share/fonts/dejavu"),
    Path("/usr/share/fonts/TTF"),
    Path("/usr/local/share/fonts"),
    Path("/Library/Fonts"),
)
FONT_FILES = {
    "": "DejaVuSans.ttf",
    "B": "DejaVuSans-Bold.ttf",
    "I": "DejaVuSans-Oblique.ttf",
    "BI": "DejaVuSans-BoldOblique.ttf",
}
MONO_FILE = "DejaVuSansMono.ttf"

_BODY = re.compile(r"<body[^>]*>(.*)</body>", re.DOTALL | re.IGNORECASE)
_TITLE = re.compile(r"<title>(.*?)</title>", re.DOTALL | re.IGNORECASE)
_LATIN1_FALLBACK = {
    "\u2192": "->", "\u2190": "<-", "\u2013": "-", "\u2014": "-", "\u2026": "...",
    "\u2713": "v", "\u2717": "x", "\u2265": ">=", "\u2264": "<=", "\u2018": "'",
    "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2022": "*", "\u20ac": "EUR",
}


class DocumentError(ServerError):
    """A document could not be rendered (bad template name, template bug, PDF failure)."""


@dataclass(frozen=True)
class Document:
    """One rendered document: the same text as HTML, PDF and (optionally) Markdown."""

    template: str
    html: str
    pdf: bytes
    markdown: str | None = None

    @property
    def title(self) -> str:
        """The HTML `<title>`, for file names and headers."""
        found = _TITLE.search(self.html)
        return found.group(1).strip() if found else self.template


@cache
def _environment() -> jinja2.Environment:
    """One Jinja2 environment: HTML autoescaped, undefined variables are errors."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def template_names() -> list[str]:
    """The document templates available (without `.html`); `_`-prefixed ones are layouts."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.html") if not p.name.startswith("_"))


def _name(template: str) -> str:
    stem = template.removesuffix(".html")
    if stem not in template_names():
        raise InvalidInput(f"no document template {template!r} (have: {template_names()})")
    return stem


def render_document(template: str, context: Mapping[str, Any]) -> Document:
    """Render `template` (a name under server/templates/documents, `.html` optional).

    CPU-bound (a PDF of a few pages takes tens of milliseconds): from async code call
    `render_document_async`.
    """
    stem = _name(template)
    env = _environment()
    try:
        html = env.get_template(f"{stem}.html").render(**context)
        md_path = TEMPLATE_DIR / f"{stem}.md"
        markdown = env.get_template(f"{stem}.md").render(**context) if md_path.exists() else None
    except jinja2.TemplateError as exc:
        raise DocumentError(f"document {stem!r} failed to render: {exc}") from exc
    return Document(template=stem, html=html, pdf=html_to_pdf(html), markdown=markdown)


async def render_document_async(template: str, context: Mapping[str, Any]) -> Document:
    """`render_document` off the event loop."""
    return await asyncio.to_thread(render_document, template, context)


@cache
def _font_dir() -> Path | None:
    for folder in FONT_DIRS:
        if all((folder / name).is_file() for name in FONT_FILES.values()):
            return folder
    return None


def _needs_unicode(body: str) -> bool:
    """Whether the text goes beyond Latin-1: only then are TrueType fonts embedded, which
    costs about a second per PDF (parsing and subsetting four fonts); Latin-1 text uses the
    PDF core fonts, which cost nothing."""
    try:
        html.unescape(body).encode("latin-1")
    except UnicodeEncodeError:
        return True
    return False


def _to_latin1(text: str) -> str:
    """Text the core fonts can show: Latin-1 as is, a few symbols spelled out, others stripped
    of their accents or replaced by '?'."""
    out = []
    for char in text:
        if ord(char) < 256:
            out.append(char)
        elif char in _LATIN1_FALLBACK:
            out.append(_LATIN1_FALLBACK[char])
        else:
            base = unicodedata.normalize("NFKD", char).encode("latin-1", "ignore").decode()
            out.append(base or "?")
    return "".join(out)


def _tag_styles(mono: str) -> dict[str, FontFace]:
    """Sober headings (fpdf2's default is dark red) and the monospace font for code."""
    ink = "#1f2937"
    return {
        "h1": TextStyle(color=ink, font_size_pt=18, t_margin=2, b_margin=2),
        "h2": TextStyle(color=ink, font_size_pt=14, t_margin=5, b_margin=1),
        "h3": TextStyle(color=ink, font_size_pt=12, t_margin=4, b_margin=1),
        "code": FontFace(family=mono),
        "pre": TextStyle(font_family=mono, t_margin=2),
    }


def html_to_pdf(html: str) -> bytes:
    """The `<body>` of `html` as a PDF (A4, fpdf2's HTML subset)."""
    found = _BODY.search(html)
    body = found.group(1) if found else html
    title = _TITLE.search(html)
    pdf = FPDF(format="A4")
    pdf.set_margins(18, 16, 18)
    pdf.set_auto_page_break(auto=True, margin=16)
    if title:
        pdf.set_title(title.group(1).strip())
    pdf.set_creator("EMU Remote Service")
    fonts = _font_dir() if _needs_unicode(body) else None
    mono = "Courier"
    if fonts is not None:
        for style, name in FONT_FILES.items():
            pdf.add_font("DejaVu", style, str(fonts / name))
        if (fonts / MONO_FILE).is_file():
            pdf.add_font("DejaVuMono", "", str(fonts / MONO_FILE))
            mono = "DejaVuMono"
        pdf.set_font("DejaVu", size=10)
    else:
        body = _to_latin1(body)
        pdf.set_font("Helvetica", size=10)
    pdf.add_page()
    try:
        pdf.write_html(body, tag_styles=_tag_styles(mono), table_line_separators=True)
        return bytes(pdf.output())
    except (FPDFException, ValueError, KeyError) as exc:
        raise DocumentError(f"PDF rendering failed: {exc}") from exc
