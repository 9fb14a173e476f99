"""Written documents: the HTML carries the content (escaped), the PDF is a real PDF of it."""

from __future__ import annotations

import io
from typing import Any

import pytest
from pypdf import PdfReader

from server import documents
from server.documents import Document, render_document, render_document_async
from server.errors import InvalidInput


def plan_context(**over: Any) -> dict[str, Any]:
    plan = {
        "id": 7, "number": "CP-0007", "version": 2, "title": "Hafen Nord storage",
        "issued_at": "2026-11-25 10:00 UTC",
        "issued_by": "lead", "customer": "Müller & Söhne <GmbH>", "mode": "remote",
        "site": {"code": "site-a", "name": "Hafen Nord", "timezone": "Europe/Berlin"},
        "visits": 2, "starts_on": "2026-12-01", "ends_on": "2026-12-03",
        "technicians": ["Ana Ruiz", "Li Wei"], "ticket_id": None, "notes": "",
        "equipment": [
            {"series": "EMU-BS", "type": "battery storage", "count": 3, "serials": ["BS1", "BS2"]},
            {"series": "EMU-PV", "type": "PV manager", "count": 2, "serials": []},
        ],
        "checklist": {"EMU-BS": [{"name": "insulation", "requirement": "≥ 500 kΩ"}]},
        "acknowledged_at": None, "acknowledged_by": None,
    }
    plan.update(over)
    return {"plan": plan}


def pdf_text(pdf: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)


def test_html_carries_the_content_escaped() -> None:
    doc = render_document("commissioning_plan", plan_context())
    assert isinstance(doc, Document)
    assert "CP-0007" in doc.html
    assert "Müller &amp; Söhne &lt;GmbH&gt;" in doc.html
    assert "Ana Ruiz, Li Wei" in doc.html
    assert "≥ 500 kΩ" in doc.html
    assert doc.title == "Commissioning plan CP-0007 v2"
    assert doc.markdown is None


def test_pdf_is_a_pdf_of_the_same_text() -> None:
    doc = render_document("commissioning_plan.html", plan_context())
    assert doc.pdf.startswith(b"%PDF-")
    text = pdf_text(doc.pdf)
    assert "Commissioning plan CP-0007" in text
    assert "EMU-BS" in text
    assert "BS1, BS2" in text
    meta = PdfReader(io.BytesIO(doc.pdf)).metadata
    assert meta is not None
    assert meta.title == "Commissioning plan CP-0007 v2"


def test_pdf_without_unicode_fonts_falls_back_to_latin1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(documents, "_font_dir", lambda: None)
    doc = render_document("commissioning_plan", plan_context(notes="ramp → 50 % — ok ł"))
    text = pdf_text(doc.pdf)
    assert "Müller" in text
    assert "ramp -> 50 % - ok ?" in text


def test_unknown_template_is_refused() -> None:
    with pytest.raises(InvalidInput, match="no document template"):
        render_document("../secrets", {})


def test_missing_context_is_a_document_error() -> None:
    with pytest.raises(documents.DocumentError, match="plan"):
        render_document("commissioning_plan", {})


async def test_async_rendering_runs_off_the_loop() -> None:
    doc = await render_document_async("commissioning_plan", plan_context())
    assert doc.pdf.startswith(b"%PDF-")
