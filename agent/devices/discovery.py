"""SunSpec auto-discovery (`profile = "sunspec"`): walk the unit's model chain, then poll it.

The walk is `protocols.sunspec.ModelChainWalker` driven over the unit's `ModbusLink`; the chain
becomes an ordinary `Profile`, so planning, decoding, qualities and events stay the
`ModbusCoordinator`'s own. Discovery runs at start and again while communication is lost (the
unit may have been replaced or updated while silent), before the data is read. Until it
succeeds every cycle is a failed cycle, so a unit without SunSpec raises `comm_lost` like a
dead one instead of ending the loop.

`layout_chain` places models back to back, so a model without a definition (an unknown vendor
id) or with an L its definition does not explain ends the usable chain: the models before it
are polled, the ones after it are not, and a warning says so.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from agent.config import DeviceSettings
from agent.coordinator import ModbusCoordinator, Sink
from agent.devices.modbus import ModbusLink
from agent.errors import CommError, DiscoveryError, ReplyError
from protocols.clock import Clock
from protocols.errors import CodecError, ProfileError, SunSpecError
from protocols.profiles import Profile, model_def, parse_profile
from protocols.registers import PointType, Table, decode
from protocols.sunspec import ModelChainWalker, ModelHeader, repeats_from_length

log = logging.getLogger(__name__)

SERIES = "SUNSPEC"
UNKNOWN = "unknown"
COMMON_MODEL = 1


@functools.cache
def _placeholder() -> Profile:
    """Stands in until discovery: the common model alone, never polled."""
    return parse_profile(
        {"series": SERIES, "kind": "hybrid", "description": "SunSpec unit, not yet discovered",
         "manufacturer": UNKNOWN, "model": UNKNOWN, "models": [{"id": COMMON_MODEL}]},
        "<sunspec placeholder>",
    )


def profile_from_chain(
    base: int,
    headers: Sequence[ModelHeader],
    *,
    manufacturer: str = UNKNOWN,
    model: str = UNKNOWN,
    poll_interval_s: float = 5.0,
) -> tuple[Profile, list[str]]:
    """A profile for a discovered chain, and warnings naming the models left out of it."""
    refs: list[dict[str, int]] = []
    notes: list[str] = []
    for i, h in enumerate(headers):
        rest = len(headers) - i - 1
        after = f"; it and the {rest} model(s) after it are not polled" if rest else (
            "; it is not polled")
        if any(r["id"] == h.id for r in refs):
            notes.append(f"model {h.id} at {h.address} appears twice{after}")
            break
        try:
            mdef = model_def(h.id)
            repeats = repeats_from_length(mdef, h.length)
        except SunSpecError as exc:
            notes.append(f"model {h.id} at {h.address}: {exc}{after}")
            break
        refs.append({"id": h.id, "repeats": repeats})
        if mdef.length(repeats) != h.length and rest:
            notes.append(f"model {h.id} at {h.address} has L={h.length}, its definition "
                         f"{mdef.length(repeats)}; the {rest} model(s) after it are not polled")
            break
    if not refs or refs[0]["id"] != COMMON_MODEL:
        raise DiscoveryError(f"the chain at {base} does not start with the common model "
                             f"(found {[h.id for h in headers][:8]})")
    ids = [r["id"] for r in refs]
    try:
        profile = parse_profile(
            {"series": SERIES, "kind": "hybrid",
             "description": f"SunSpec models {ids} at {base}, discovered",
             "manufacturer": manufacturer, "model": model, "sunspec_base": base,
             "poll_interval_s": poll_interval_s, "models": refs},
            "<sunspec discovery>",
        )
    except ProfileError as exc:
        raise DiscoveryError(str(exc)) from exc
    placed = [(h.id, h.address) for h in profile.headers]
    found = [(h.id, h.address) for h in headers[: len(placed)]]
    if placed != found:  # cannot happen if layout_chain and the walker agree; never poll blind
        raise DiscoveryError(f"the profile places models at {placed}, the unit has {found}")
    return profile, notes


class DiscoveringCoordinator(ModbusCoordinator):
    """A `ModbusCoordinator` for a unit whose profile is `sunspec`: it learns the layout itself."""

    def __init__(
        self,
        device: DeviceSettings,
        link: ModbusLink,
        sink: Sink,
        clock: Clock | None = None,
        backoff_cap_s: float = 30.0,
    ) -> None:
        super().__init__(device, _placeholder(), link, sink, clock, backoff_cap_s)
        self.discovered: Profile | None = None
        self.chain: tuple[int, ...] = ()
        self.discoveries = 0
        self._problem: str | None = None
        # nothing to read (or to mark comm_lost) before the layout is known
        self.points = ()
        self.plan = []
        self._by_name = {}
        self.stats.reads_per_cycle = 0

    async def poll_once(self) -> bool:
        """Discover first (at start, and while communication is lost), then poll as usual."""
        if (self.discovered is None or self.comm_lost) and not await self._discovery_cycle():
            return False
        return await super().poll_once()

    async def discover(self) -> bool:
        """Walk the chain once without polling (commissioning probes); True if discovered."""
        return await self._discovery_cycle()

    async def _discovery_cycle(self) -> bool:
        try:
            await self._connect()
            base, headers = await self._walk()
            manufacturer, model = await self._identity(headers)
            profile, notes = profile_from_chain(
                base, headers, manufacturer=manufacturer, model=model,
                poll_interval_s=self.device.poll_interval_s,
            )
        except CommError as exc:
            self._note(exc)
            self.link.close()
            return await self._not_discovered(str(exc), logging.DEBUG)
        except DiscoveryError as exc:
            return await self._not_discovered(str(exc), logging.WARNING)
        except Exception as exc:  # a bug must not end the loop
            log.exception("%s: unexpected error in SunSpec discovery", self.name)
            self.stats.errors += 1
            return await self._not_discovered(f"{type(exc).__name__}: {exc}", logging.DEBUG)
        self._adopt(profile, tuple(h.id for h in headers), notes)
        return True

    async def _not_discovered(self, problem: str, level: int) -> bool:
        self.stats.cycles += 1
        self.stats.last_error = problem
        if problem != self._problem:  # once per distinct problem, not every cycle
            log.log(level, "%s: SunSpec discovery failed: %s", self.name, problem)
            self._problem = problem
        await self._failed(1)
        return False

    async def _walk(self) -> tuple[int, list[ModelHeader]]:
        walker = ModelChainWalker()
        try:
            while (req := walker.next_read()) is not None:
                address, count = req
                self.stats.reads += 1
                try:
                    regs: list[int] | None = await self.link.read(Table.HOLDING, address, count)
                except ReplyError as exc:  # no marker there: the walker tries the next base
                    log.debug("%s: %s", self.name, exc)
                    regs = None
                walker.feed(regs)
        except SunSpecError as exc:
            raise DiscoveryError(f"{self.link.where}: {exc}") from exc
        if walker.base is None:  # pragma: no cover - the walker raises first
            raise DiscoveryError(f"{self.link.where}: no SunS marker")
        return walker.base, walker.models

    async def _identity(self, headers: Sequence[ModelHeader]) -> tuple[str, str]:
        """Manufacturer and model from the common model; placeholders if they cannot be read."""
        if not headers or headers[0].id != COMMON_MODEL:
            return UNKNOWN, UNKNOWN
        pts = {p.name.rsplit(".", 1)[-1]: p for p in model_def(COMMON_MODEL).layout(
            headers[0].address)}
        mn, md = pts["Mn"], pts["Md"]
        self.stats.reads += 1
        try:
            regs = await self.link.read(Table.HOLDING, mn.address, md.end - mn.address)
            texts = [decode(PointType.STRING, regs[p.address - mn.address:p.end - mn.address])
                     for p in (mn, md)]
        except (ReplyError, CodecError) as exc:
            log.info("%s: cannot read the unit's name: %s", self.name, exc)
            return UNKNOWN, UNKNOWN
        return str(texts[0] or UNKNOWN), str(texts[1] or UNKNOWN)

    def _adopt(self, profile: Profile, chain: tuple[int, ...], notes: list[str]) -> None:
        self.discoveries += 1
        self._problem = None
        before, self.chain = self.chain, chain
        if self.discovered is not None:
            if profile.model_dump() == self.discovered.model_dump():
                return
            log.warning("%s: the unit's SunSpec chain changed from %s to %s",
                        self.name, list(before), list(chain))
        log.info("%s: SunSpec models %s at %d (%s %s)", self.name, list(chain),
                 profile.sunspec_base, profile.manufacturer, profile.model)
        for note in notes:
            log.warning("%s: %s", self.name, note)
        self.discovered = profile
        self.set_profile(profile)
