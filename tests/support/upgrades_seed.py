"""Seed rows of the upgrade service for the API's scoping walk (rows only, nothing rendered)."""

from __future__ import annotations

import secrets
from datetime import datetime

from sqlmodel.ext.asyncio.session import AsyncSession

from server.upgrades.models import PlanDocument, ReleasePackage, RolloutTarget, UpgradePlan


async def seed_upgrade_plan(session: AsyncSession, org_id: int, site_id: int, unit_id: int,
                            marker: str, now: datetime) -> tuple[int, int]:
    """A release (without the marker: releases are not an organisation's) and a running plan
    of one site with a document and a target, each carrying `marker`; (plan id, release id)."""
    version = f"9.{secrets.randbelow(10**6)}.{secrets.randbelow(10**6)}"
    release = ReleasePackage(series="EMU-BS", version=version, sha256="0" * 64, size=1,
                             image_sha256="0" * 64, signature="", path="none.bin",
                             uploaded_at=now)
    session.add(release)
    await session.flush()
    assert release.id is not None
    plan = UpgradePlan(title=f"upgrade {marker}", org_id=org_id, release_id=release.id,
                       state="running", series="EMU-BS", site_ids=[site_id],
                       impact=f"impact {marker}", created_at=now, updated_at=now,
                       requested_at=now, document_version=1,
                       confirmed_window={"start": "2031-01-01T00:00", "end": "2031-01-01T01:00"})
    session.add(plan)
    await session.flush()
    assert plan.id is not None
    session.add(PlanDocument(plan_id=plan.id, version=1, title=f"plan {marker}",
                             html=f"<html><body>plan {marker}</body></html>",
                             pdf=b"%PDF-1.3 stub", created_at=now))
    session.add(RolloutTarget(plan_id=plan.id, unit_id=unit_id, site_id=site_id,
                              device=f"unit-{marker}", to_version=version))
    await session.flush()
    return plan.id, release.id
