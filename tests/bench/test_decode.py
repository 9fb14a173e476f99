"""Benchmark: one poll cycle's decoding, `CompiledDecoder` against `decode_image`.

The registers are the simulator's own: `SimUnit`s of the profile with unit ids 1..UNITS, each
read through the agent's read plan (`plan_reads(poll_points, max_gap=profile.max_gap)`), so the
mix of values, "not implemented" sentinels, scale factors and strings is what the agent sees.
One cycle is one unit's responses. Three ways are timed on the same cycles, in the same process,
round by round in turn:

- **compiled**: `CompiledDecoder.decode(responses, errors)`, what the coordinator does now;
- **image**: `decode_image(poll_points, image, errors)` on a `RegisterImage` built beforehand,
  the decoding alone as the coordinator did it before;
- **image + put**: building the `RegisterImage` from the responses, then `decode_image`: the
  coordinator's whole former path from `_read_all`'s responses to the readings.

Times are the thread's CPU time (so a busy neighbour does not count), as medians of the rounds
in µs per cycle, with the ratio against the compiled decoder. Asserts sanity (the same
readings as `decode_image` for every unit), never speed.

Run: `pytest -m bench tests/bench/test_decode.py -s`.
"""

from __future__ import annotations

import gc
import statistics
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import pytest
from pymodbus.simulator import SimData

from protocols.decoder import CompiledDecoder
from protocols.planner import ReadRequest, plan_reads
from protocols.profiles import load_profile
from protocols.registers import PointDef, Reading, RegisterImage, Table, decode_image
from simulators.unit import SimUnit

pytestmark = pytest.mark.bench

UNITS = 20
"""Distinct units (register contents) cycled through in every round."""
REPEATS = 25
"""Passes over the units per round: UNITS * REPEATS cycles a round."""
ROUNDS = 7
Responses = list[list[int] | None]


def unit_responses(profile_name: str, units: int) -> tuple[list[ReadRequest], list[Responses]]:
    """The agent's read plan for the profile, and each simulated unit's answers to it."""
    profile = load_profile(profile_name)
    plan = plan_reads(profile.poll_points, max_gap=profile.max_gap)
    cycles: list[Responses] = []
    for n in range(1, units + 1):
        device = SimUnit(profile, n, serial=f"{profile.model}-{n:06d}").simdevice()
        simdata = cast(Any, device.simdata)
        blocks = {
            table: cast(list[SimData], simdata[index])[0]
            for table, index in ((Table.HOLDING, 2), (Table.INPUT, 3))
        }
        cycle: Responses = []
        for req in plan:
            block = blocks[req.table]
            start = req.address - block.address
            cycle.append(list(cast(list[int], block.values)[start : start + req.count]))
        cycles.append(cycle)
    return plan, cycles


def _image(plan: Sequence[ReadRequest], responses: Responses) -> RegisterImage:
    image = RegisterImage()
    for req, regs in zip(plan, responses, strict=True):
        if regs is not None:
            image.put(req.table, req.address, regs)
    return image


def _same(a: dict[str, Reading], b: dict[str, Reading]) -> bool:
    """Equal readings, floats by their bits (NaN included)."""
    def key(v: object) -> object:
        return (float, struct.pack(">d", v)) if isinstance(v, float) else (type(v), v)

    return [(k, key(r.value), key(r.raw), r.out_of_range) for k, r in a.items()] == [
        (k, key(r.value), key(r.raw), r.out_of_range) for k, r in b.items()
    ]


def cpu_us_per_cycle(run: Callable[[], int]) -> float:
    """Thread CPU µs per cycle of one round; `run` returns the cycles it did."""
    gc.collect()
    start = time.thread_time_ns()
    cycles = run()
    return (time.thread_time_ns() - start) / 1000 / cycles


def compare(profile_name: str) -> dict[str, float]:
    """Time the three ways on one profile; print a block; return the medians."""
    profile = load_profile(profile_name)
    points: tuple[PointDef, ...] = profile.poll_points
    plan, cycles = unit_responses(profile_name, UNITS)
    t0 = time.thread_time_ns()
    compiled = CompiledDecoder.for_plan(points, plan)
    compile_us = (time.thread_time_ns() - t0) / 1000
    images = [_image(plan, c) for c in cycles]
    for c, image in zip(cycles, images, strict=True):
        want_errors: list[str] = []
        got_errors: list[str] = []
        assert _same(compiled.decode(c, got_errors), decode_image(points, image, want_errors))
        assert got_errors == want_errors

    def run_compiled() -> int:
        decode = compiled.decode
        for _ in range(REPEATS):
            for c in cycles:
                decode(c, [])
        return REPEATS * len(cycles)

    def run_image() -> int:
        for _ in range(REPEATS):
            for image in images:
                decode_image(points, image, [])
        return REPEATS * len(images)

    def run_image_put() -> int:
        for _ in range(REPEATS):
            for c in cycles:
                decode_image(points, _image(plan, c), [])
        return REPEATS * len(cycles)

    ways = {"compiled": run_compiled, "image": run_image, "image + put": run_image_put}
    for run in ways.values():  # warm-up
        run()
    rounds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(ROUNDS):
        for name, run in ways.items():
            rounds[name].append(cpu_us_per_cycle(run))
    medians = {name: statistics.median(values) for name, values in rounds.items()}

    base = medians["compiled"]
    print(f"\n== decoding one poll cycle: {profile_name}, {len(points)} points, "
          f"{len(plan)} requests ({', '.join(str(r.count) for r in plan)} registers) ==")
    print(f"{UNITS} simulated units x {REPEATS} passes per round, {ROUNDS} rounds; "
          f"thread CPU time; compiling the plan once: {compile_us:.0f} us")
    for name, values in rounds.items():
        median = medians[name]
        print(f"  {name:12s} median {median:6.1f} us/cycle  ratio {median / base:4.2f}"
              f"  rounds: {', '.join(f'{v:.0f}' for v in values)}")
    return medians


@pytest.mark.parametrize("profile_name", ["EMU-BS", "EMU-PV"])
def test_compiled_decoder_against_decode_image(profile_name: str) -> None:
    """Same readings; µs per cycle of the compiled decoder and of `decode_image`."""
    medians = compare(profile_name)
    assert all(m > 0 for m in medians.values())
