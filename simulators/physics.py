"""Plausible values for a simulated unit, as a pure function of time and active faults.

Everything is closed-form in `t` (seconds since the unit started), so a fleet of hundreds of
units costs nothing between reads: values are computed only when someone reads them. A
"day" is compressed into `period_s` so that SoC, PV output and energy counters visibly move.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

from protocols.profiles import Profile
from protocols.registers import Value
from simulators.faults import Effects

# SunSpec scale factors the simulated units report, by SF point name (others are 0)
SCALE_FACTORS: dict[str, int] = {
    "A_SF": -1,
    "V_SF": -1,
    "W_SF": 1,
    "Hz_SF": -2,
    "VA_SF": 1,
    "VAr_SF": 1,
    "PF_SF": -2,
    "WH_SF": 0,
    "DCA_SF": -1,
    "DCV_SF": -1,
    "DCW_SF": 1,
    "Tmp_SF": -1,
    "WChaMax_SF": 1,
    "VAChaMax_SF": 1,
    "ChaState_SF": -1,
    "InBatV_SF": -1,
    "WHRtg_SF": 2,
    "WChaDisChaMax_SF": 1,
    "DisChaRte_SF": -2,
    "SoC_SF": -1,
    "DoD_SF": -1,
    "SoH_SF": -1,
    "CellV_SF": -3,
    "AMax_SF": -1,
    "Riso_SF": 0,
}
MPPT_SCALE_FACTORS: dict[str, int] = {"DCA_SF": -2, "DCV_SF": -1, "DCW_SF": 0, "DCWH_SF": 0}

STATUS = {
    "OFF": 0,
    "STANDBY": 1,
    "RUNNING": 2,
    "DERATING": 3,
    "FAULT": 4,
    "UPDATING": 5,
    "TRIPPED": 6,
}
INVERTER_ST = {"MPPT": 4, "THROTTLED": 5, "FAULT": 7, "STANDBY": 8}


@dataclass(frozen=True, slots=True)
class Nameplate:
    """Ratings of one simulated unit."""

    rated_w: float
    capacity_wh: float
    period_s: float = 7200.0


class UnitPhysics:
    """Values of one unit at time `t`, in engineering units, keyed by profile point name."""

    def __init__(self, profile: Profile, unit_id: int, serial: str, seed: int) -> None:
        self.profile = profile
        self.unit_id = unit_id
        self.serial = serial
        self.seed = seed
        battery = profile.kind == "battery_storage"
        self.plate = Nameplate(
            rated_w=100_000.0 if battery else 50_000.0,
            capacity_wh=215_000.0 if battery else 20_000.0,
        )
        self.phase = (seed % 628) / 100.0
        self.names = {p.name for p in profile.points}
        self.mppt = sum(m.repeats for m in profile.models if m.id == 160)

    def _noise(self, t: float, k: int, amp: float) -> float:
        return amp * math.sin(t * (0.37 + 0.011 * k) + self.seed * (k + 1))

    def static_values(self, firmware_version: str) -> dict[str, Value | None]:
        """Nameplate and identity values that do not move."""
        v: dict[str, Value | None] = {
            "common.Mn": self.profile.manufacturer,
            "common.Md": self.profile.model,
            "common.Opt": "emu-sim",
            "common.Vr": firmware_version,
            "common.SN": self.serial,
            "common.DA": self.unit_id,
            "emu.FwVer": firmware_version,
        }
        for p in self.profile.points:
            if p.type.value == "sunssf":
                leaf = p.name.rsplit(".", 1)[-1]
                table = MPPT_SCALE_FACTORS if p.name.startswith("mppt.") else SCALE_FACTORS
                v[p.name] = table.get(leaf, 0)
        rated = self.plate.rated_w
        v.update(
            {
                "storage_basic.WChaMax": rated,
                "storage_basic.VAChaMax": rated,
                "storage_basic.MinRsvPct": 10,
                "storage_basic.StorCtl_Mod": 3,
                "battery.AHRtg": 280,
                "battery.WHRtg": self.plate.capacity_wh,
                "battery.WChaRteMax": rated,
                "battery.WDisChaRteMax": rated,
                "battery.SoCMax": 95.0,
                "battery.SoCMin": 5.0,
                "battery.SoH": 98.0,
                "battery.Typ": 4,
                "battery.LocRemCtl": 1,
                "mppt.N": self.mppt,
                "mppt.TmsPer": 0,
                "bms.RackCount": 4,
            }
        )
        for i in range(1, self.mppt + 1):
            v[f"mppt.module{i}.ID"] = i
            v[f"mppt.module{i}.IDStr"] = f"MPPT{i}"
        return {k: val for k, val in v.items() if k in self.names}

    def sample(self, t: float, eff: Effects, *, broken: bool = False) -> dict[str, Value | None]:
        """The moving values at time `t` under the active faults."""
        plate = self.plate
        w = 2 * math.pi / plate.period_s
        x = w * t + self.phase
        battery = self.profile.kind == "battery_storage"
        soc = 55.0 + 25.0 * math.cos(x)
        if eff.soc_override is not None:
            soc = eff.soc_override
        if battery:
            p_ac = 0.6 * plate.rated_w * math.sin(x)  # + discharge, - charge
            pv = 0.0
        else:
            pv = plate.rated_w * 0.85 * max(0.0, math.sin(x)) + self._noise(t, 1, 200.0)
            pv = max(pv, 0.0)
            p_ac = pv * 0.97
        limit = 1.0
        if eff.derate_pct is not None:
            limit = eff.derate_pct / 100.0
            p_ac = max(-limit * plate.rated_w, min(limit * plate.rated_w, p_ac))
        stopped = eff.grid_lost or eff.tripped or broken
        if stopped:
            p_ac = 0.0
        load = abs(p_ac) / plate.rated_w
        v_ph = 0.0 if eff.grid_lost else 230.0 + self._noise(t, 2, 1.5)
        hz = 0.0 if eff.grid_lost else 50.0 + self._noise(t, 3, 0.02)
        amps = abs(p_ac) / (3 * v_ph) if v_ph else 0.0
        dc_v = 700.0 + 1.5 * soc if battery else 620.0 + self._noise(t, 4, 5.0)
        dc_w = p_ac / 0.97 if battery else pv
        tmp = 25.0 + 12.0 * load + self._noise(t, 5, 0.5) + eff.temp_offset
        hours = t / 3600.0
        energy = 120_000_000.0 + 0.6 * plate.rated_w * (2 / math.pi) * hours
        status = "RUNNING"
        st = "MPPT"
        if limit < 1.0:
            status, st = "DERATING", "THROTTLED"
        if stopped:
            status, st = ("FAULT" if broken else "TRIPPED"), "FAULT"
        alarms = set(eff.alarms) | ({"FIRMWARE_FAULT"} if broken else set())
        riso = eff.riso_kohm if eff.riso_kohm is not None else 2000 + self._noise(t, 6, 50)
        v: dict[str, Value | None] = {
            "inverter_three_phase.A": amps * 3,
            "inverter_three_phase.AphA": amps,
            "inverter_three_phase.AphB": amps,
            "inverter_three_phase.AphC": amps,
            "inverter_three_phase.PPVphAB": v_ph * math.sqrt(3),
            "inverter_three_phase.PPVphBC": v_ph * math.sqrt(3),
            "inverter_three_phase.PPVphCA": v_ph * math.sqrt(3),
            "inverter_three_phase.PhVphA": v_ph,
            "inverter_three_phase.PhVphB": v_ph,
            "inverter_three_phase.PhVphC": v_ph,
            "inverter_three_phase.W": p_ac,
            "inverter_three_phase.Hz": hz,
            "inverter_three_phase.VA": abs(p_ac) / 0.98,
            "inverter_three_phase.VAr": p_ac * 0.05,
            "inverter_three_phase.PF": 0.98 if p_ac else 1.0,
            "inverter_three_phase.WH": energy,
            "inverter_three_phase.DCA": dc_w / dc_v,
            "inverter_three_phase.DCV": dc_v,
            "inverter_three_phase.DCW": dc_w,
            "inverter_three_phase.TmpCab": tmp - 5.0,
            "inverter_three_phase.TmpSnk": tmp + 8.0,
            "inverter_three_phase.St": INVERTER_ST[st],
            "inverter_three_phase.Evt1": self._bits(
                "inverter_three_phase.Evt1", eff.inverter_events
            ),
            "emu.Status": STATUS[status],
            "emu.Alarm": self._bits("emu.Alarm", alarms),
            "emu.Warning": self._bits("emu.Warning", eff.warnings),
            "emu.IntTmp": tmp + 5.0,
            "emu.Riso": riso,
            "emu.DerateLim": round(limit * 100),
            "emu.Uptime": int(t),
            "storage_basic.ChaState": soc,
            "storage_basic.InBatV": dc_v,
            "storage_basic.StorAval": soc / 100 * plate.capacity_wh / 1000,
            "storage_basic.ChaSt": 3 if p_ac > 0 else 4,
            "battery.SoC": soc,
            "battery.DoD": 100 - soc,
            "battery.NCyc": 300 + int(hours / 2),
            "battery.ChaSt": 3 if p_ac > 0 else 4,
            "battery.State": 99 if stopped else 3,
            "battery.Evt1": self._bits("battery.Evt1", eff.battery_events),
            "battery.V": dc_v,
            "battery.VMax": 950.0,
            "battery.VMin": 600.0,
            "battery.CellVMax": 3.30 + soc / 1000,
            "battery.CellVMin": 3.26 + soc / 1000,
            "battery.CellVAvg": 3.28 + soc / 1000,
            "battery.A": dc_w / dc_v,
            "battery.W": dc_w,
            "bms.CellTmpMax": tmp + 2.0,
            "bms.CellTmpMin": tmp - 4.0,
            "bms.CellVMax": 3.30 + soc / 1000,
            "bms.CellVMin": 3.26 + soc / 1000,
            "bms.ChaWh": int(80_000_000 + 0.3 * plate.rated_w * hours),
            "bms.DisChaWh": int(76_000_000 + 0.3 * plate.rated_w * hours),
            "grid.ExportW": int(p_ac * 0.6),
            "grid.ImportWh": int(3_000_000 + 100 * hours),
            "grid.ExportWh": int(90_000_000 + 0.4 * plate.rated_w * hours),
        }
        for i in range(1, self.mppt + 1):
            share = pv / max(self.mppt, 1)
            mv = 600.0 + self._noise(t, 10 + i, 8.0)
            v[f"mppt.module{i}.DCV"] = mv
            v[f"mppt.module{i}.DCA"] = share / mv
            v[f"mppt.module{i}.DCW"] = share
            v[f"mppt.module{i}.DCWH"] = int(60_000_000 + 0.25 * plate.rated_w * hours)
            v[f"mppt.module{i}.Tmp"] = round(tmp)
            v[f"mppt.module{i}.DCSt"] = 4 if share > 0 else 8
        return {k: val for k, val in v.items() if k in self.names}

    def _bits(self, point: str, names: set[str] | frozenset[str]) -> int:
        if point not in self.names or not names:
            return 0
        symbols = {name: bit for bit, name in self.profile.point(point).symbols}
        return sum(1 << symbols[n] for n in names if n in symbols)


def unit_seed(series: str, unit_id: int) -> int:
    """A stable seed per unit, so that two runs of the simulator tell the same story."""
    return zlib.crc32(f"{series}/{unit_id}".encode())
