"""Agent enrolment over HTTP: admins issue one-time tokens, agents exchange them for credentials.

    POST /sites/{code}/enrolments   admin bearer token    -> 201 {token, expires_at, ...}
    POST /enrol                     no bearer: the token  -> 200 {broker_username, ...}

Mounted under `/api/v1` like every router. The second route is the only one an agent calls
without a bearer token: the one-time token is the credential. Both answers carry secrets, so
they are marked `Cache-Control: no-store`. What the server hands out besides the password
(the broker URL agents use, the CA to trust) comes from `app.state.enrolment`
(`server.enrolment.EnrolmentOptions`); without it, agents keep the broker settings they have.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlmodel import select

from server.api.deps import AdminUser, NowDep, SessionDep
from server.enrolment import (
    DEFAULT_TTL,
    MAX_TTL,
    MIN_TTL,
    EnrolmentOptions,
    check_agent_id,
    create_enrolment,
    redeem,
)
from server.schemas import SiteCode

router = APIRouter(tags=["enrolment"])

NO_STORE = {"Cache-Control": "no-store"}

AgentId = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
Token = Annotated[str, StringConstraints(min_length=16, max_length=256, pattern=r"^[\x21-\x7e]+$")]


def get_enrolment_options(request: Request) -> EnrolmentOptions:
    """`app.state.enrolment` if the app set one, else the defaults (nothing extra handed out)."""
    options = getattr(request.app.state, "enrolment", None)
    return options if isinstance(options, EnrolmentOptions) else EnrolmentOptions()


OptionsDep = Annotated[EnrolmentOptions, Depends(get_enrolment_options)]


class EnrolmentCreate(BaseModel):
    """An admin asks for a token; the agent id defaults to the site code."""

    model_config = ConfigDict(extra="forbid")

    agent_id: AgentId | None = None
    ttl_s: int = Field(
        default=int(DEFAULT_TTL.total_seconds()),
        ge=int(MIN_TTL.total_seconds()),
        le=int(MAX_TTL.total_seconds()),
        description="seconds until the token expires",
    )


class EnrolmentIssued(BaseModel):
    """The token, shown this once."""

    site: str
    agent_id: str
    token: str
    expires_at: datetime


class EnrolRequest(BaseModel):
    """What `emu agent enrol` sends."""

    model_config = ConfigDict(extra="forbid")

    token: Token
    agent_id: AgentId
    ssh_public_key: str | None = Field(
        default=None, max_length=2000,
        description="the agent's OpenSSH public key for the remote-session gateway")


class EnrolResponse(BaseModel):
    """The agent's broker credentials (the user name is the site code)."""

    site: str
    agent_id: str
    broker_username: str
    broker_password: str
    broker_url: str | None = None
    ca_pem: str | None = None
    command_key: str | None = None
    """The server's command public key (base64 Ed25519): the agent obeys only what it signed."""
    gateway: str | None = None
    """`host:port` of the remote-session SSH gateway (when it has a host key)."""
    gateway_host_key: str | None = None
    """The gateway's host key for the agent to pin."""


@router.post(
    "/sites/{code}/enrolments",
    status_code=201,
    response_model=EnrolmentIssued,
    responses={404: {"description": "no such site"}, 409: {"description": "agent elsewhere"}},
)
async def issue_enrolment(
    code: SiteCode,
    body: EnrolmentCreate,
    session: SessionDep,
    admin: AdminUser,
    now: NowDep,
    options: OptionsDep,
    response: Response,
) -> EnrolmentIssued:
    """Issue a one-time enrolment token for an agent of site `code` (admins only)."""
    agent_id = check_agent_id(body.agent_id or code)
    enrolment = await create_enrolment(
        session, code, agent_id, timedelta(seconds=body.ttl_s), now=now, options=options
    )
    await session.commit()
    response.headers.update(NO_STORE)
    return EnrolmentIssued(
        site=enrolment.site,
        agent_id=enrolment.agent_id,
        token=enrolment.token,
        expires_at=enrolment.expires_at,
    )


@router.post(
    "/enrol",
    response_model=EnrolResponse,
    responses={
        401: {"description": "unknown or expired token"},
        403: {"description": "token issued for another agent"},
        409: {"description": "token used already"},
    },
)
async def enrol(
    request: Request,
    body: EnrolRequest,
    session: SessionDep,
    now: NowDep,
    options: OptionsDep,
    response: Response,
) -> EnrolResponse:
    """Exchange a one-time enrolment token for this agent's broker credentials."""
    commands = getattr(request.app.state, "commands", None)
    command_key = None
    if commands is not None:
        await commands.load_key()
        command_key = commands.public_key
    creds = await redeem(session, body.token, body.agent_id, now=now, options=options)
    gateway, gateway_key = await _register_ssh_key(request, session, body)
    await session.commit()  # the token is spent before the password leaves the server
    response.headers.update(NO_STORE)
    return EnrolResponse(
        site=creds.site,
        agent_id=creds.agent_id,
        broker_username=creds.username,
        broker_password=creds.password,
        broker_url=creds.broker_url,
        ca_pem=creds.ca_pem,
        command_key=command_key,
        gateway=gateway,
        gateway_host_key=gateway_key,
    )


async def _register_ssh_key(request: Request, session: SessionDep,
                            body: EnrolRequest) -> tuple[str | None, str | None]:
    """Keep the agent's gateway key; the gateway address and host key for it to pin."""
    from server.app import gateway_public_key
    from server.models import Agent
    from server.sessions.keys import set_agent_key

    if body.ssh_public_key:
        agent = (await session.exec(select(Agent).where(Agent.agent_id == body.agent_id))).one()
        await set_agent_key(session, agent, body.ssh_public_key)
    settings = getattr(request.app.state, "settings", None)
    if settings is None:
        return None, None
    host_key = getattr(request.app.state, "gateway_host_key", None) or gateway_public_key(
        settings)
    if host_key is None:
        return None, None
    host = settings.gateway.public_host or settings.gateway.host
    return f"{host}:{settings.gateway.port}", host_key
