"""Agent enrolment: a one-time token that an agent exchanges for its own broker credentials.

    admin   create_enrolment(site, agent_id, ttl) -> token   shown once; only its SHA-256 kept
    agent   redeem(token, agent_id) -> Credentials            user = site code, random password
    ops     `emu server broker-passwd --out FILE`, SIGHUP      the broker learns the new password

The broker user name of an agent is its **site code**, so one ACL pattern per topic
(`emu/v1/%u/...`, deploy/mosquitto/acl) confines every agent to its own site. Consequence: a
site has one set of broker credentials. Enrolling again (a replacement gateway, a lost
password) rotates the password and moves the user name to the agent that enrolled last; the
previous credentials stop working when the broker reloads its password file.

The password is stored only as Mosquitto's `$7$` PBKDF2 hash (server/broker_auth.py), which
is what the broker's password file needs. A token on an `Agent` row is in one of three states:

    pending   enrolment_token_hash set, enrolment_expires in the future
    expired   enrolment_expires <= now                          -> Unauthorized (401)
    used      enrolment_token_hash kept, enrolment_expires NULL -> Conflict (409)

Keeping the hash of a used token lets a second use be told apart from a wrong token. The use
is one conditional UPDATE (`... WHERE token hash matches AND enrolment_expires IS NOT NULL`),
so of two concurrent redemptions exactly one matches a row; callers commit before they hand
the password out.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.enrolment import Credentials
from protocols.errors import TopicError
from protocols.topics import validate_site
from server.broker_auth import SERVER_USERNAME, hash_password
from server.core.security import Unauthorized, hash_token, new_token
from server.errors import Conflict, Forbidden, InvalidInput, NotFound
from server.models import Agent, Site

DEFAULT_TTL = timedelta(hours=24)
MIN_TTL = timedelta(minutes=1)
MAX_TTL = timedelta(days=30)


@dataclass(frozen=True)
class EnrolmentOptions:
    """What the server hands out with credentials, and which user names sites may not take."""

    broker_url: str | None = None
    """The broker as agents reach it (`mqtts://mqtt.example.net:8883`); None: leave theirs."""
    ca_pem: str | None = None
    """The CA certificate agents should trust for the broker's TLS listener, PEM."""
    reserved_usernames: frozenset[str] = frozenset({SERVER_USERNAME})
    """Broker users that are not sites (the server's own): such a site cannot enrol."""


@dataclass(frozen=True)
class Enrolment:
    """A token just issued (its plain text exists only here and in the admin's hands)."""

    site: str
    agent_id: str
    token: str = field(repr=False)
    expires_at: datetime


def check_agent_id(agent_id: str) -> str:
    """Agent ids follow the site-code rules (one topic-safe word, at most 64 characters)."""
    try:
        return validate_site(agent_id)
    except TopicError as exc:
        raise InvalidInput(str(exc).replace("site id", "agent id")) from exc


def new_password() -> str:
    """A broker password: 256 random bits, URL-safe text."""
    return secrets.token_urlsafe(32)


async def create_enrolment(
    session: AsyncSession,
    site_code: str,
    agent_id: str,
    ttl: timedelta = DEFAULT_TTL,
    *,
    now: datetime,
    options: EnrolmentOptions | None = None,
) -> Enrolment:
    """Issue a one-time token for `agent_id` at site `site_code`, valid for `ttl`.

    Creates the agent if it is new; a pending token of that agent is replaced. The caller
    commits. NotFound for an unknown site, Conflict if the agent belongs to another site,
    InvalidInput for a bad agent id or ttl.
    """
    opts = options or EnrolmentOptions()
    check_agent_id(agent_id)
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise InvalidInput(f"ttl must be between {MIN_TTL} and {MAX_TTL}, not {ttl}")
    site = (await session.exec(select(Site).where(Site.code == site_code))).first()
    if site is None or site.id is None:
        raise NotFound(f"site {site_code!r} not found")
    if site.code in opts.reserved_usernames:
        raise Conflict(
            f"site code {site.code!r} is the broker user of the server itself; "
            "an agent of this site cannot get broker credentials"
        )
    agent = (await session.exec(select(Agent).where(Agent.agent_id == agent_id))).first()
    if agent is None:
        agent = Agent(agent_id=agent_id, site_id=site.id)
    elif agent.site_id != site.id:
        raise Conflict(f"agent {agent_id!r} belongs to another site")
    token = new_token()
    agent.enrolment_token_hash = hash_token(token)
    agent.enrolment_expires = now + ttl
    session.add(agent)
    await session.flush()
    return Enrolment(site=site.code, agent_id=agent_id, token=token, expires_at=now + ttl)


async def redeem(
    session: AsyncSession,
    token: str,
    agent_id: str,
    *,
    now: datetime,
    options: EnrolmentOptions | None = None,
) -> Credentials:
    """Use `token` once: give `agent_id` fresh broker credentials (see the module docstring).

    Unauthorized for an unknown or expired token, Conflict for a used one, Forbidden if the
    token was issued for another agent. The caller commits before handing anything out.
    """
    opts = options or EnrolmentOptions()
    token_hash = hash_token(token)
    found = (
        await session.exec(
            select(Agent, Site)
            .join(Site, col(Site.id) == col(Agent.site_id))
            .where(Agent.enrolment_token_hash == token_hash)
        )
    ).first()
    if found is None:
        raise Unauthorized("unknown enrolment token (ask the administrator for a new one)")
    agent, site = found
    if agent.enrolment_expires is None:
        raise Conflict("this enrolment token was used already; ask for a new one")
    if agent.enrolment_expires <= now:
        raise Unauthorized("this enrolment token has expired; ask for a new one")
    if agent.agent_id != agent_id:
        raise Forbidden(f"this enrolment token was issued for another agent, not {agent_id!r}")
    if site.code in opts.reserved_usernames:
        raise Conflict(f"site code {site.code!r} is reserved for the server's broker user")
    password = new_password()
    await _consume(session, agent, token_hash, site.code, hash_password(password), now)
    return Credentials(
        site=site.code,
        agent_id=agent.agent_id,
        username=site.code,
        password=password,
        broker_url=opts.broker_url,
        ca_pem=opts.ca_pem,
    )


async def _consume(
    session: AsyncSession,
    agent: Agent,
    token_hash: str,
    username: str,
    password_hash: str,
    now: datetime,
) -> None:
    """Mark the token used (exactly once), then move the site's broker user to `agent`."""
    used = await session.exec(
        sa.update(Agent)
        .where(col(Agent.id) == agent.id)
        .where(col(Agent.enrolment_token_hash) == token_hash)
        .where(col(Agent.enrolment_expires).is_not(None))
        .values(enrolment_expires=None, enrolled_at=now)
    )
    if used.rowcount != 1:
        raise Conflict("this enrolment token was used already; ask for a new one")
    # One broker user per site: whoever held it before loses it (unique column, so first).
    await session.exec(
        sa.update(Agent)
        .where(col(Agent.mqtt_username) == username)
        .where(col(Agent.id) != agent.id)
        .values(mqtt_username=None, mqtt_password_hash=None)
    )
    await session.exec(
        sa.update(Agent)
        .where(col(Agent.id) == agent.id)
        .values(mqtt_username=username, mqtt_password_hash=password_hash)
    )
    await session.refresh(agent)
