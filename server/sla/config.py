"""The `[sla]` section of the server settings: terms on top of the defaults, mail, timing.

    [sla]
    group_window_s = 600          # A/B faults of one site this close share one ticket
    cd_faults = "ticket"          # C/D faults: "ticket" (one per site and code) or "none"
    [sla.terms]                   # see server/sla/policy.py: SlaTerms
    warn_at = 0.75
    [[sla.terms.chain]]
    level = "lead"
    email = "lead@vendor.example"
    webhook = "https://chat.example/hooks/sla"
    [sla.smtp]
    host = "smtp.vendor.example"
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from emu.settings import Section
from server.sla.errors import SlaConfigError
from server.sla.policy import resolve_terms


class SmtpSettings(Section):
    """Where escalation emails go out (no host: email notifications are not sent)."""

    host: str | None = None
    port: int = Field(default=25, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    sender: str = "emu-sla@localhost"
    starttls: bool = False
    use_tls: bool = False
    timeout_s: float = Field(default=10.0, gt=0)


class SlaSettings(Section):
    """SLA engine settings; `terms` must validate against `SlaTerms` after merging."""

    terms: dict[str, Any] = Field(default_factory=dict)
    group_window_s: float = Field(default=600.0, ge=0)
    cd_faults: Literal["ticket", "none"] = "ticket"
    smtp: SmtpSettings = SmtpSettings()
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    batch: int = Field(default=100, ge=1, le=10000)
    retry_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    lease_s: float = Field(default=120.0, gt=0)

    @field_validator("terms")
    @classmethod
    def _check_terms(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            resolve_terms(value)
        except SlaConfigError as exc:
            raise ValueError(str(exc)) from None
        return value
