#!/usr/bin/env python3
"""Builds wattbus's Grafana dashboards and alert rules from code.

    python3 grafana/build.py            # writes grafana/dashboards/*.json and
                                        # grafana/provisioning/alerting/wattbus-rules.json
    python3 grafana/build.py --check    # fails if a file differs from what this builds, or
                                        # does not survive Grafana's own schema types

Needs the `grafana-foundation-sdk` package (PyPI, Grafana's typed builders and models; the
test command installs it). Grafana itself never runs this: it loads the JSON files, which are
checked in. To change a dashboard, change this file and run it; a test
(tests/tests/grafana.rs) then runs every query of every panel and alert against a real
InfluxDB. The settings a user is expected to change are at the top; docs/grafana.md says
which is which.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import (
    alerting,
    bargauge,
    common as cb,
    dashboard as db,
    stat,
    statetimeline,
    table,
    text,
    timeseries,
)
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import alerting as am
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import text as tm

# --- What a user sets ----------------------------------------------------------------------

# Power overload: a device (any channel) whose mean power over a minute is above its threshold.
# "*" is every device without its own line. 3680 W = 16 A at 230 V, a common circuit breaker.
OVERLOAD_W = {"*": 3680.0, "heat-pump": 6000.0}

# Fridge and freezer: (lowest, highest) in °C, and how long a temperature must stay outside
# before the alert fires. Channels are matched by name (`fridge`, `freezer`, `fridge-2`, ...).
FRIDGE_C = (0.0, 8.0)
FREEZER_C = (-30.0, -15.0)
TEMPERATURE_MINUTES = 15

# Prices per kWh of each tariff register, the defaults of the Overview dashboard's price boxes
# (change them there and save, or here). The WE-515 has four tariffs, t1..t4.
PRICES = {"t1": 0.30, "t2": 0.20, "t3": 0.30, "t4": 0.30}
CURRENCY = "currencyEUR"  # a Grafana unit: currencyUSD, currencyGBP, currencyCHF, ...

# --- Conventions ---------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent
DATASOURCE_UID = "wattbus-influxdb"  # provisioning/datasources (1.8) and influxdb2/ (2.x)
DS = dm.DataSourceRef(type_val="influxdb", uid=DATASOURCE_UID)
FOLDER_UID = "wattbus"
FOLDER = "wattbus"
MINUTES_RP = "minutes"  # `wattbus influx setup`: 1-minute aggregates, kept for ever

# Below this `$__interval` a panel reads raw readings, from it up the 1-minute aggregates: a
# day or more on screen never scans a day of 1 Hz readings on the Pi.
RAW_BELOW_MS = 60_000

SITE = '"site" =~ /^$site$/'
GOOD = "\"quality\" = 'good'"


class InfluxQuery(cogvariants.Dataquery):
    """A raw InfluxQL target of Grafana's InfluxDB data source (the SDK has no InfluxDB model)."""

    def __init__(self, ref_id: str, query: str, alias: str | None, result_format: str):
        self.ref_id = ref_id
        self.query = query
        self.alias = alias
        self.result_format = result_format

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "datasource": {"type": "influxdb", "uid": DATASOURCE_UID},
            "query": self.query,
            "rawQuery": True,
            "refId": self.ref_id,
            "resultFormat": self.result_format,
        }
        if self.alias:
            out["alias"] = self.alias
        return out


class Q(cogbuilder.Builder[InfluxQuery]):
    def __init__(self, ref_id: str, query: str, alias: str | None = None, fmt: str = "time_series"):
        self._q = InfluxQuery(ref_id, query, alias, fmt)

    def build(self) -> InfluxQuery:
        return self._q


def tags(*names: str) -> str:
    return ", ".join(f'"{n}"' for n in names)


def series(measurement: str, raw: str, minutes: str, where: str, group: tuple[str, ...], alias: str, refs: str = "AB") -> list[Q]:
    """Two targets, of which Grafana's `$__interval` makes exactly one return rows: raw readings
    below RAW_BELOW_MS, the `minutes` aggregates from it up (same alias, so one line)."""
    by = tags(*group)
    return [
        Q(
            refs[0],
            f'SELECT {raw} FROM "{measurement}" WHERE {where} AND $timeFilter '
            f"AND $__interval_ms < {RAW_BELOW_MS} GROUP BY time($__interval), {by} fill(null)",
            alias,
        ),
        Q(
            refs[1],
            f'SELECT {minutes} FROM "{MINUTES_RP}"."{measurement}" WHERE {where} AND $timeFilter '
            f"AND $__interval_ms >= {RAW_BELOW_MS} GROUP BY time($__interval), {by} fill(null)",
            alias,
        ),
    ]


def mean(field: str) -> tuple[str, str]:
    return f'mean("{field}")', f'mean("mean_{field}")'


def maximum(field: str) -> tuple[str, str]:
    return f'max("{field}")', f'max("max_{field}")'


def last(field: str) -> tuple[str, str]:
    return f'last("{field}")', f'last("last_{field}")'


def increase(field: str) -> tuple[str, str]:
    """What a counter that restarts at 0 with its service grew by in each interval."""
    return (
        f'non_negative_difference(last("{field}"))',
        f'non_negative_difference(last("last_{field}"))',
    )


def ts(
    title: str,
    unit: str,
    targets: list[Q],
    w: int = 12,
    h: int = 8,
    span_nulls_ms: int = 5_000,
    description: str | None = None,
    thresholds: list[tuple[float | None, str]] | None = None,
) -> timeseries.Panel:
    """A time series. Lines are continuous where readings exist: a null bucket (an interval
    with no reading, at 1 s resolution when readings come every second or slower) is bridged
    up to `span_nulls_ms`; a longer silence is drawn as a gap, as it should be."""
    p = (
        timeseries.Panel()
        .title(title)
        .datasource(DS)
        .unit(unit)
        .targets(targets)
        .span(w)
        .height(h)
        .span_nulls(span_nulls_ms)
        .line_width(1)
        .fill_opacity(10)
        .show_points(cm.VisibilityMode.NEVER)
        .legend(cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST).placement(cm.LegendPlacement.BOTTOM).show_legend(True))
        .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.NONE))
    )
    if description:
        p = p.description(description)
    if thresholds:
        p = p.thresholds(steps(thresholds)).thresholds_style(cb.GraphThresholdsStyleConfig().mode(cm.GraphTresholdsStyleMode.LINE))
    return p


def steps(thresholds: list[tuple[float | None, str]]) -> db.ThresholdsConfig:
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps([dm.Threshold(value=v, color=c) for v, c in thresholds])


def single(
    title: str,
    unit: str,
    targets: list[Q],
    w: int = 6,
    h: int = 5,
    time_from: str | None = None,
    description: str | None = None,
    decimals: int | None = None,
) -> stat.Panel:
    p = (
        stat.Panel()
        .title(title)
        .datasource(DS)
        .unit(unit)
        .targets(targets)
        .span(w)
        .height(h)
        .graph_mode(cm.BigValueGraphMode.NONE)
        .color_mode(cm.BigValueColorMode.VALUE)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .thresholds(steps([(None, "green")]))
    )
    if time_from:
        p = p.time_from(time_from)
    if description:
        p = p.description(description)
    if decimals is not None:
        p = p.decimals(decimals)
    return p


def bars(title: str, unit: str, targets: list[Q], w: int = 12, h: int = 8, time_from: str | None = None, description: str | None = None) -> bargauge.Panel:
    p = (
        bargauge.Panel()
        .title(title)
        .datasource(DS)
        .unit(unit)
        .targets(targets)
        .span(w)
        .height(h)
        .display_mode(cm.BarGaugeDisplayMode.BASIC)
        .orientation(cm.VizOrientation.HORIZONTAL)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .thresholds(steps([(None, "blue")]))
    )
    if time_from:
        p = p.time_from(time_from)
    if description:
        p = p.description(description)
    return p


def note(title: str, content: str, w: int = 24, h: int = 3) -> text.Panel:
    return text.Panel().title(title).mode(tm.TextMode.MARKDOWN).content(content).span(w).height(h)


def tag_variable(name: str, label: str, query: str, multi: bool = True) -> db.QueryVariable:
    v = (
        db.QueryVariable(name)
        .label(label)
        .datasource(DS)
        .query(query)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .include_all(multi)
        .multi(multi)
    )
    return v


def site_variable() -> db.QueryVariable:
    return tag_variable("site", "Site", 'SHOW TAG VALUES WITH KEY = "site"')


def device_variable(measurement: str, label: str = "Device", extra: str = "") -> db.QueryVariable:
    cond = f"WHERE {SITE}" + (f" AND {extra}" if extra else "")
    return tag_variable("device", label, f'SHOW TAG VALUES FROM "{measurement}" WITH KEY = "device" {cond}')


def new_dashboard(uid: str, title: str, description: str, time_from: str = "now-6h") -> db.Dashboard:
    return (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["wattbus"])
        .timezone("browser")
        .time(time_from, "now")
        .refresh("30s")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .editable()
        .link(db.DashboardLink("wattbus").type(dm.DashboardLinkType.DASHBOARDS).tags(["wattbus"]).as_dropdown(True).keep_time(True).include_vars(True))
    )


def dev(extra: str = "", quality: str = GOOD) -> str:
    w = f'{SITE} AND "device" =~ /^$device$/ AND {quality}'
    return f"{w} AND {extra}" if extra else w


# --- Overview ------------------------------------------------------------------------------

ENERGY_SOURCES = (
    "Energy comes from each device's own counter (a meter's total register, a plug's, a CT "
    "channel's imported energy kept by rms-processor), never from integrating power: the "
    "difference between the highest and lowest reading in the range. CT channels without a "
    "voltage count apparent energy (VAh), which is not added here (CT channels dashboard)."
)


def used(measurement: str, where: str, group: tuple[str, ...], columns: list[tuple[str, str]], scale: str = " / 1000") -> str:
    """What counters grew by in the range, from the 1-minute aggregates: the sum of each
    minute's increase of the counter's highest value. A counter that went back (reset by
    `wattbus energy reset`, a meter replaced under the same name) loses only that step; the
    highest minus the lowest would count its whole earlier total. `columns` are (field, name)."""
    by = tags(*group)
    inner = ", ".join(f'non_negative_difference(max("max_{field}")) AS "{name}"' for field, name in columns)
    outer = ", ".join(f'sum("{name}"){scale} AS "{name}"' for _, name in columns)
    return (
        f'SELECT {outer} FROM (SELECT {inner} FROM "{MINUTES_RP}"."{measurement}" WHERE {where} AND $timeFilter '
        f"GROUP BY time(1m), {by}) GROUP BY {by}"
    )


def energy_in_range(title: str, time_from: str) -> stat.Panel:
    """Energy used in `time_from` (today, this week, this month), per device and channel, from
    counters: the meters' total register (tariff = ''), every other device's energy_wh, and CT
    channels' imported energy."""
    group = ("device", "channel")
    meter = used("energy", dev("\"tariff\" = ''"), group, [("energy_wh", "kwh")])
    other = used("power", dev(), group, [("energy_wh", "kwh")])
    ct_import = used("power", dev(), group, [("energy_import_wh", "kwh")])
    return single(
        title,
        "kwatth",
        [Q("A", meter, "$tag_device/$tag_channel"), Q("B", other, "$tag_device/$tag_channel"), Q("C", ct_import, "$tag_device/$tag_channel")],
        w=8,
        h=7,
        time_from=time_from,
        description=ENERGY_SOURCES + " Read from the 1-minute aggregates (up to a minute behind): a day of raw 1 Hz readings per series is too much to scan every refresh on a Pi.",
        decimals=2,
    )


def tariff_energy(time_from: str) -> bargauge.Panel:
    q = used("energy", dev("\"tariff\" =~ /^t[1-4]$/"), ("device", "channel", "tariff"), [("energy_wh", "kwh")])
    label = "today" if time_from == "now/d" else "this month"
    return bars(f"Energy per tariff, {label}", "kwatth", [Q("A", q, "$tag_device/$tag_channel $tag_tariff")], w=12, time_from=time_from, description="From each meter's tariff registers (WE-515: t1..t4).")


def tariff_cost(time_from: str) -> bargauge.Panel:
    targets = []
    for i, tariff in enumerate(sorted(PRICES)):
        q = used("energy", dev(f"\"tariff\" = '{tariff}'"), ("device", "channel"), [("energy_wh", "cost")], scale=f" / 1000 * $price_{tariff}")
        targets.append(Q(chr(ord("A") + i), q, f"$tag_device/$tag_channel {tariff}"))
    label = "today" if time_from == "now/d" else "this month"
    return bars(
        f"Cost per tariff, {label}",
        CURRENCY,
        targets,
        w=12,
        time_from=time_from,
        description="Each tariff register's energy times its price per kWh (the price boxes at the top; docs/grafana.md).",
    )


def overview() -> db.Dashboard:
    d = new_dashboard("wattbus-overview", "wattbus: Overview", "Power now, energy today, this week and this month, per tariff and its cost.")
    d = d.with_variable(site_variable()).with_variable(device_variable("power"))
    for tariff, price in sorted(PRICES.items()):
        d = d.with_variable(db.TextBoxVariable(f"price_{tariff}").label(f"Price {tariff} per kWh").default_value(str(price)))
    now_q = f'SELECT last("power_w") FROM "power" WHERE {dev()} AND $timeFilter GROUP BY "device", "channel"'
    d = d.with_row(db.Row("Now"))
    d = d.with_panel(
        bars("Power now", "watt", [Q("A", now_q, "$tag_device/$tag_channel")], w=8, h=8, time_from="5m", description="The last good reading of the last 5 minutes, per device and channel.")
    )
    raw, mins = mean("power_w")
    d = d.with_panel(ts("Power", "watt", series("power", raw, mins, dev(), ("device", "channel"), "$tag_device/$tag_channel"), w=16, h=8))
    d = d.with_row(db.Row("Energy"))
    d = d.with_panel(energy_in_range("Energy today", "now/d"))
    d = d.with_panel(energy_in_range("Energy this week", "now/w"))
    d = d.with_panel(energy_in_range("Energy this month", "now/M"))
    d = d.with_panel(tariff_energy("now/d"))
    d = d.with_panel(tariff_cost("now/d"))
    d = d.with_panel(tariff_energy("now/M"))
    d = d.with_panel(tariff_cost("now/M"))
    imp = used("power", dev(), ("device", "channel"), [("energy_import_wh", "import"), ("energy_export_wh", "export")])
    d = d.with_panel(
        bars(
            "Import and export today",
            "kwatth",
            [Q("A", imp, "$tag_device/$tag_channel $col")],
            w=24,
            h=6,
            time_from="now/d",
            description="Devices that count both directions (a CT channel with measured voltage): energy taken from and given to the grid.",
        )
    )
    return d


# --- Meter ---------------------------------------------------------------------------------


def meter() -> db.Dashboard:
    d = new_dashboard("wattbus-meter", "wattbus: Meter", "One Modbus meter (ORNO WE-515 and kin): voltage, current, power, power factor, frequency, reactive power, energy per tariff.")
    d = d.with_variable(site_variable()).with_variable(device_variable("energy", "Meter"))
    group = ("device", "channel")
    alias = "$tag_device/$tag_channel"
    for title, field, unit in [
        ("Voltage", "voltage_v", "volt"),
        ("Current", "current_a", "amp"),
        ("Active power", "power_w", "watt"),
        ("Power factor", "power_factor", "none"),
        ("Frequency", "frequency_hz", "hertz"),
        ("Reactive power", "reactive_power_var", "voltamperereact"),
    ]:
        raw, mins = mean(field)
        d = d.with_panel(ts(title, unit, series("power", raw, mins, dev(), group, alias)))
    raw, mins = last("energy_wh")
    d = d.with_panel(
        ts(
            "Energy counters per tariff",
            "watth",
            series("energy", raw, mins, dev(), ("device", "channel", "tariff"), "$tag_device/$tag_channel $tag_tariff"),
            span_nulls_ms=30_000,
            description="The meter's own registers (read every 10 s): total (no tariff) and t1..t4.",
        )
    )
    q = used("energy", dev(), ("device", "channel", "tariff"), [("energy_wh", "kwh")])
    d = d.with_panel(bars("Energy in the time range, per tariff", "kwatth", [Q("A", q, "$tag_device/$tag_channel $tag_tariff")]))
    return d


# --- CT channels ---------------------------------------------------------------------------


def ct() -> db.Dashboard:
    d = new_dashboard(
        "wattbus-ct",
        "wattbus: CT channels",
        "Current transformer channels: RMS current and power from rms-processor, with the basis of the power (measured voltage, or a nominal one), and PowMon-style sensors.",
    )
    basis = "\"power_basis\" != ''"
    measured = "\"power_basis\" = 'measured'"
    nominal = "\"power_basis\" = 'nominal_voltage'"
    d = d.with_variable(site_variable()).with_variable(device_variable("power", "Sensor", basis))
    group = ("device", "channel")
    raw, mins = mean("current_a")
    d = d.with_panel(ts("RMS current", "amp", series("power", raw, mins, dev(basis), group, "$tag_device/$tag_channel")))
    raw_p, mins_p = mean("power_w")
    raw_s, mins_s = mean("apparent_power_va")
    d = d.with_panel(
        ts(
            "Power, with its basis",
            "watt",
            series("power", raw_p, mins_p, dev(measured), group, "$tag_device/$tag_channel active (measured voltage)")
            + series("power", raw_s, mins_s, dev(nominal), group, "$tag_device/$tag_channel apparent (nominal voltage)", refs="CD"),
            description="With a voltage channel, rms-processor measures active power (W). Without one it can only give apparent power (VA): current times the configured nominal voltage, an upper bound for resistive and motor loads alike.",
        )
    )
    raw_i, mins_i = last("energy_import_wh")
    raw_a, mins_a = last("apparent_energy_vah")
    d = d.with_panel(
        ts(
            "Energy counters",
            "watth",
            series("power", raw_i, mins_i, dev(measured), group, "$tag_device/$tag_channel imported (Wh)")
            + series("power", raw_a, mins_a, dev(nominal), group, "$tag_device/$tag_channel apparent (VAh)", refs="CD"),
            span_nulls_ms=30_000,
            description="rms-processor's counters, kept on disk across restarts (docs/rms-processor.md).",
        )
    )
    e_measured = used("power", dev(measured), ("device", "channel"), [("energy_import_wh", "imported"), ("energy_export_wh", "exported")])
    e_nominal = used("power", dev(nominal), ("device", "channel"), [("apparent_energy_vah", "apparent (kVAh)")])
    d = d.with_panel(
        bars("Energy in the time range", "kwatth", [Q("A", e_measured, "$tag_device/$tag_channel $col"), Q("B", e_nominal, "$tag_device/$tag_channel $col")])
    )
    # Sensors that compute current themselves (PowMon): measurement `current`.
    d = d.with_row(db.Row("Sensors that report current themselves (PowMon)"))
    site_only = f"{SITE} AND {GOOD}"
    raw, mins = mean("current_a")
    d = d.with_panel(ts("Current", "amp", series("current", raw, mins, site_only, group, "$tag_device/$tag_channel")))
    raw, mins = mean("power_w")
    d = d.with_panel(ts("Power (nominal voltage)", "watt", series("current", raw, mins, site_only, group, "$tag_device/$tag_channel")))
    return d


# --- Temperatures --------------------------------------------------------------------------


def temperatures() -> db.Dashboard:
    d = new_dashboard("wattbus-temperatures", "wattbus: Temperatures", "Fridges and freezers with the thresholds of their alerts.")
    d = d.with_variable(site_variable()).with_variable(device_variable("temperature"))
    raw, mins = mean("temperature_c")
    for title, pattern, (low, high) in [("Fridges", "fridge", FRIDGE_C), ("Freezers", "freezer", FREEZER_C)]:
        # Out-of-range readings too: a fridge warmer than its probe's range is what to see.
        where = dev(f'"channel" =~ /{pattern}/', quality="\"quality\" =~ /^(good|out_of_range)$/")
        d = d.with_panel(
            ts(
                f"{title} ({low:g} to {high:g} °C)",
                "celsius",
                series("temperature", raw, mins, where, ("device", "channel"), "$tag_device/$tag_channel"),
                span_nulls_ms=10_000,
                thresholds=[(None, "blue"), (low, "green"), (high, "red")],
                description=f"Alert when outside for {TEMPERATURE_MINUTES} minutes (grafana/provisioning/alerting).",
            )
        )
    d = d.with_panel(ts("Every temperature", "celsius", series("temperature", raw, mins, dev(), ("device", "channel"), "$tag_device/$tag_channel"), w=24, span_nulls_ms=10_000))
    return d


# --- Plugs (completed by plug-bridge) ------------------------------------------------------

PLUG_MEASUREMENT = "plug"


def plugs() -> db.Dashboard:
    d = new_dashboard("wattbus-plugs", "wattbus: Plugs", "Smart plugs: power, energy, relay state, and a switch (plug-bridge).")
    d = d.with_variable(site_variable()).with_variable(device_variable(PLUG_MEASUREMENT, "Plug"))
    d = d.with_variable(
        tag_variable("plug", "Switch", f'SHOW TAG VALUES FROM "{PLUG_MEASUREMENT}" WITH KEY = "device" WHERE {SITE}', multi=False)
    )
    d = d.with_panel(switch_panel()).with_panel(
        note(
            "About the switch",
            "Pick the plug in **Switch** above, an action, then **Switch**: after you confirm, Grafana's server "
            "sends it to plug-bridge with the token it keeps (data source `plug-bridge`), and the panel shows "
            "the state **read back from the plug**, or why it could not (the plug did not answer in time: "
            "nothing is switched later). Every switch is logged by plug-bridge with your Grafana login.",
            w=12,
            h=6,
        )
    )
    raw, mins = mean("power_w")
    d = d.with_panel(ts("Power", "watt", series(PLUG_MEASUREMENT, raw, mins, dev(), ("device",), "$tag_device")))
    raw, mins = last("energy_wh")
    d = d.with_panel(ts("Energy counter", "watth", series(PLUG_MEASUREMENT, raw, mins, dev(), ("device",), "$tag_device")))
    raw_r, mins_r = last("relay_on")
    d = d.with_panel(
        timeline()
        .title("Relay")
        .datasource(DS)
        .targets(series(PLUG_MEASUREMENT, raw_r, mins_r, dev(), ("device",), "$tag_device"))
        .span(24)
        .height(6)
        .mappings([on_off("on", "off")])
        .thresholds(steps([(None, "red"), (1, "green")]))
    )
    return d


# The switch: Business Forms (volkovlabs-form-panel) and the Infinity data source, both signed
# and installed by compose (GF_INSTALL_PLUGINS), both for Grafana 11.6. The panel's requests go
# to Grafana's own data source proxy, never to plug-bridge from the browser.
FORM_PANEL = "volkovlabs-form-panel"
FORM_PANEL_VERSION = "6.3.1"
PLUG_API_UID = "wattbus-plug-bridge"  # provisioning/datasources/plug-bridge.yaml
PLUG_API = f"/api/datasources/proxy/uid/{PLUG_API_UID}/api/v1/plugs/${{plug}}"

# The panel's code runs in the browser (`context` is the form's); no `$` in it: Grafana would
# take it for a variable.
INITIAL_CODE = """const r = context.panel.response;
if (r && !r.ok) {
  return r.text().then((t) => {
    let m = t;
    try { m = JSON.parse(t).error || t; } catch (e) {}
    context.grafana.notifyError(['Cannot read the plug (HTTP ' + r.status + ')', String(m || r.statusText)]);
  });
}"""
UPDATE_PAYLOAD = """const a = context.panel.elements.find((e) => e.id === 'action');
return { action: a ? a.value : '' };"""
UPDATE_CODE = """const r = context.panel.response;
if (!r) { return; }
return r.text().then((t) => {
  let b = {};
  try { b = JSON.parse(t); } catch (e) { b = { error: t || r.statusText }; }
  if (r.ok && b.ok) {
    context.grafana.notifySuccess(['Plug ' + b.plug + ': ' + b.action, 'The plug reads ' + (b.relay_on ? 'ON' : 'OFF')]);
    context.panel.initialRequest();
  } else {
    context.grafana.notifyError(['Not switched (HTTP ' + r.status + ')', String(b.error || 'no answer')]);
    context.panel.initialRequest();
  }
});"""


def switch_panel() -> db.Panel:
    def element(uid: str, id_: str, title: str, type_: str, options: list[dict[str, object]]) -> dict[str, object]:
        return {
            "uid": uid, "id": id_, "title": title, "type": type_, "value": "", "labelWidth": 10, "width": None,
            "tooltip": "", "section": "", "unit": "", "optionsSource": "Custom", "allowCustomValue": False, "options": options,
        }

    def option(id_: str, label: str, value: object) -> dict[str, object]:
        return {"id": id_, "label": label, "type": "string", "value": value}

    request = {"contentType": "application/json", "header": [], "datasource": "", "payload": {}, "highlight": False, "highlightColor": "red"}
    options = {
        "sync": True,
        "updateEnabled": "auto",
        "elementValueChanged": "",
        "layout": {"variant": "single", "orientation": "horizontal", "padding": 10, "sectionVariant": "default"},
        "buttonGroup": {"orientation": "center", "size": "md"},
        "submit": {"variant": "primary", "icon": "power", "text": "Switch", "backgroundColor": "purple", "foregroundColor": "yellow"},
        "reset": {"variant": "hidden", "icon": "process", "text": "Reset", "backgroundColor": "purple", "foregroundColor": "yellow"},
        "saveDefault": {"variant": "hidden", "icon": "save", "text": "Save Default"},
        "resetAction": {"mode": "initial", "code": "", "datasource": "", "getPayload": "return {}", "payload": {}, "confirm": False},
        "elements": [
            element("plug-action", "action", "Action", "radio", [option("on", "On", "on"), option("off", "Off", "off"), option("toggle", "Toggle", "toggle")]),
            element("plug-state", "relay_on", "The plug reads", "disabled", [option("t", "ON", True), option("f", "OFF", False)]),
            element("plug-online", "online", "Online", "disabled", [option("t", "yes", True), option("f", "no", False)]),
        ],
        "initial": {**request, "method": "GET", "url": PLUG_API, "payloadMode": "all", "getPayload": "return {}", "confirm": False, "code": INITIAL_CODE},
        "update": {**request, "method": "POST", "url": PLUG_API + "/relay", "payloadMode": "custom", "getPayload": UPDATE_PAYLOAD, "confirm": True, "code": UPDATE_CODE},
        "confirmModal": {
            "title": "Switch the plug?",
            "body": "plug-bridge sets the relay, then reads the plug back.",
            "columns": {"include": ["name", "newValue"], "name": "", "oldValue": "Now", "newValue": "Switch"},
            "confirm": "Switch",
            "cancel": "Cancel",
            "elementDisplayMode": "modified",
        },
    }
    return (
        db.Panel()
        .type(FORM_PANEL)
        .plugin_version(FORM_PANEL_VERSION)
        .title("Switch $plug")
        .description("Switches the plug chosen in Switch, through plug-bridge's API (data source plug-bridge); shows what the plug reads back.")
        .datasource(dm.DataSourceRef(type_val="datasource", uid="grafana"))
        .with_target(GrafanaTarget("A"))
        .options(options)
        .span(12)
        .height(6)
    )


class GrafanaQuery(cogvariants.Dataquery):
    """The "-- Grafana --" data source's empty query: the form panel runs its own request
    once the panel's query is done."""

    def __init__(self, ref_id: str):
        self.ref_id = ref_id

    def to_json(self) -> dict[str, object]:
        return {"refId": self.ref_id}


class GrafanaTarget(cogbuilder.Builder[GrafanaQuery]):
    def __init__(self, ref_id: str):
        self._q = GrafanaQuery(ref_id)

    def build(self) -> GrafanaQuery:
        return self._q


def timeline() -> statetimeline.Panel:
    return statetimeline.Panel().show_value(cm.VisibilityMode.AUTO).merge_values(True).row_height(0.9).align_value("left").legend(
        cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST).placement(cm.LegendPlacement.BOTTOM).show_legend(True)
    )


def on_off(on: str, off: str) -> dm.ValueMap:
    return dm.ValueMap(
        options={
            "1": dm.ValueMappingResult(text=on, color="green"),
            "0": dm.ValueMappingResult(text=off, color="red"),
        }
    )


# --- System health -------------------------------------------------------------------------


def health() -> db.Dashboard:
    d = new_dashboard(
        "wattbus-health",
        "wattbus: System health",
        "Every service's status (published on the bus every 10 s, stored by influx-writer as measurement `service`), the Modbus lines, and backups.",
        time_from="now-3h",
    )
    d = d.with_variable(site_variable()).with_variable(tag_variable("instance", "Service", f'SHOW TAG VALUES FROM "service" WITH KEY = "device" WHERE {SITE}'))
    inst = f'{SITE} AND "device" =~ /^$instance$/'
    up = series("service", 'min("up")', 'min("min_up")', inst, ("device",), "$tag_device")
    d = d.with_panel(
        timeline()
        .title("Services up")
        .description("up while a service runs (its status every 10 s), down if it went offline at any time in the interval; a gap is a service that stopped reporting.")
        .datasource(DS)
        .targets(up)
        .span(24)
        .height(7)
        .interval("10s")
        .mappings([on_off("up", "down")])
        .thresholds(steps([(None, "red"), (1, "green")]))
    )
    lately = f'SELECT last("uptime_s") FROM "service" WHERE {inst} AND $timeFilter GROUP BY "device"'
    d = d.with_panel(
        bars("Uptime", "s", [Q("A", lately, "$tag_device")], w=8, h=8, time_from="5m", description="Since each service last started (the last status of the last 5 minutes).")
    )
    for title, fn, field, unit, desc in [
        ("Journal depth", maximum, "journal_records", "short", "Readings a service holds that not every sink has acknowledged. It drains on its own once a sink is back."),
        ("Oldest unacknowledged reading", maximum, "journal_oldest_s", "s", "Age of the oldest reading not yet stored everywhere: readings that old are waiting for a sink."),
    ]:
        raw, mins = fn(field)
        d = d.with_panel(ts(title, unit, series("service", raw, mins, inst, ("device",), "$tag_device"), w=8, h=8, span_nulls_ms=30_000, description=desc))
    for title, field, desc in [
        ("Replays", "replayed", "Records a producer published again because a sink did not acknowledge them in time."),
        ("Dead letters", "dead_letters", "Messages set aside as unstorable (malformed, mislabelled, refused by InfluxDB): docs/influx-writer.md."),
        ("Errors", "errors", "Every error event of each service, all kinds (docs/metrics.md); the kinds are on each service's /metrics."),
        ("Messages sent", "sent", "Readings published through the journal."),
    ]:
        raw, mins = increase(field)
        d = d.with_panel(ts(title, "short", series("service", raw, mins, inst, ("device",), "$tag_device"), w=12, h=7, span_nulls_ms=30_000, description=desc))
    d = node_row(d)
    d = d.with_row(db.Row("Modbus"))
    mb = f"{SITE} AND {GOOD}"
    for title, field in [("Timeouts per meter", "timeouts"), ("CRC errors per meter", "crc_errors"), ("Exceptions per meter", "exceptions"), ("Retries per meter", "retries")]:
        raw, mins = increase(field)
        d = d.with_panel(ts(title, "short", series("modbus_device", raw, mins, mb, ("device",), "$tag_device"), w=6, h=7, span_nulls_ms=30_000, description="Per interval (the meter's totals since modbus-ingest started, as increases)."))
    raw, mins = mean("latency_ms")
    d = d.with_panel(ts("Request latency per line", "ms", series("modbus_bus", raw, mins, mb, ("device",), "$tag_device"), span_nulls_ms=30_000))
    raw, mins = mean("utilisation")
    d = d.with_panel(
        ts("Line utilisation", "percentunit", series("modbus_bus", raw, mins, mb, ("device",), "$tag_device"), span_nulls_ms=30_000, description="Share of time the RS485 line is busy: near 1, polls start to slip.")
    )
    d = d.with_row(db.Row("Backups"))
    d = d.with_panel(
        note(
            "Backups",
            "backup-rotator (docs/backups.md) reports measurement `backup` every minute: `age_s` "
            "since the newest good set, `last_run_ok` (0 when the last run failed: its log says "
            "why), `failures` in a row, the newest set's `last_bytes`, `last_points` and "
            "`last_duration_s`, and `full_sets`, `incremental_sets`, `stored_bytes` kept. The "
            "alert \"Backup older than 2 h\" reads `age_s`. `wattbus backup list` shows the sets.",
            w=8,
            h=6,
        )
    )
    def last(field: str) -> str:
        return f'SELECT last("{field}") FROM "backup" WHERE {SITE} AND $timeFilter GROUP BY "device"'

    d = d.with_panel(single("Last backup age", "s", [Q("A", last("age_s"), "$tag_device")], w=4, h=6, time_from="3h"))
    d = d.with_panel(
        single(
            "Last backup run",
            "none",
            [Q("A", last("last_run_ok"), "$tag_device")],
            w=4,
            h=6,
            time_from="3h",
            description="1: the last run made a good set (or had nothing to do); 0: it failed and is being retried.",
        )
    )
    d = d.with_panel(single("Newest set", "bytes", [Q("A", last("last_bytes"), "$tag_device")], w=4, h=6, time_from="3h"))
    d = d.with_panel(
        single(
            "Sets kept",
            "none",
            [Q("A", last("full_sets"), "full $tag_device"), Q("B", last("incremental_sets"), "incremental $tag_device")],
            w=4,
            h=6,
            time_from="3h",
        )
    )
    return d


# What node-health (docs/node-health.md) publishes, judged: the Pi's CPU is throttled from
# 80 °C (soft limit 60–70 °C on some models, hard 85 °C), and an SD card or disk this full is a
# day of readings from stopping the stack.
CPU_HOT_C = 80
DISK_FULL_PCT = 90
NODE = f'{SITE} AND "device" =~ /^$node$/'


def node_row(d: db.Dashboard) -> db.Dashboard:
    """The machines wattbus runs on: measurement `node_health`, one device per node."""
    d = d.with_row(db.Row("Nodes")).with_variable(
        tag_variable("node", "Node", f'SHOW TAG VALUES FROM "node_health" WITH KEY = "device" WHERE {SITE}')
    )
    for title, fn, field, unit, desc, thresholds in [
        ("CPU use", mean, "cpu_use_pct", "percent", "Share of all cores busy, per node.", None),
        ("CPU temperature", maximum, "cpu_temperature_c", "celsius", f"The SoC's temperature; a Pi slows its CPU down from about {CPU_HOT_C} °C. Missing where the kernel has no thermal zone.", [(None, "green"), (70, "orange"), (CPU_HOT_C, "red")]),
        ("Memory used", mean, "mem_used_pct", "percent", "Memory not available to new programs (MemAvailable), per node.", [(None, "green"), (90, "red")]),
        ("Load (1 min)", mean, "load_1m", "short", "Runnable and waiting tasks; above the core count (4 on a Pi) work queues up.", None),
        ("Disk used", maximum, "disk_used_pct", "percent", "The data directory's file system, as df counts it.", [(None, "green"), (80, "orange"), (DISK_FULL_PCT, "red")]),
        ("SD card writes", mean, "disk_write_bytes_per_s", "Bps", "Bytes written per second to the disk holding the data directory: what wears an SD card out.", None),
    ]:
        raw, mins = fn(field)
        d = d.with_panel(ts(title, unit, series("node_health", raw, mins, NODE, ("device",), "$tag_device"), w=8, h=7, span_nulls_ms=30_000, description=desc, thresholds=thresholds))
    raw, mins = maximum("under_voltage_occurred")
    d = d.with_panel(
        timeline()
        .title("Under-voltage (Raspberry Pi)")
        .description("The Pi's firmware saw its supply below 4.63 V in the interval: a weak power supply or cable, the usual cause of SD-card corruption. Only on a Pi.")
        .datasource(DS)
        .targets(series("node_health", raw, mins, NODE, ("device",), "$tag_device"))
        .span(12)
        .height(5)
        .interval("10s")
        .mappings([dm.ValueMap(options={"0": dm.ValueMappingResult(text="ok", color="green"), "1": dm.ValueMappingResult(text="under-voltage", color="red")})])
        .thresholds(steps([(None, "green"), (1, "red")]))
    )
    raw, mins = maximum("throttled_occurred")
    d = d.with_panel(
        timeline()
        .title("Throttled (Raspberry Pi)")
        .description("The firmware slowed the CPU (heat or under-voltage) in the interval. Only on a Pi.")
        .datasource(DS)
        .targets(series("node_health", raw, mins, NODE, ("device",), "$tag_device"))
        .span(12)
        .height(5)
        .interval("10s")
        .mappings([dm.ValueMap(options={"0": dm.ValueMappingResult(text="ok", color="green"), "1": dm.ValueMappingResult(text="throttled", color="red")})])
        .thresholds(steps([(None, "green"), (1, "red")]))
    )
    return d


# --- Alert rules ---------------------------------------------------------------------------

NO_DATA_OK = "OK"


def influx(ref: str, query: str, seconds: int) -> alerting.Query:
    return alerting.Query(ref).datasource_uid(DATASOURCE_UID).relative_time_range(am.RelativeTimeRange(from_val=seconds, to=0)).model(Q(ref, query))


class Expr(cogvariants.Dataquery):
    def __init__(self, model: dict[str, object]):
        self.model = model

    def to_json(self) -> dict[str, object]:
        return self.model


class E(cogbuilder.Builder[Expr]):
    def __init__(self, model: dict[str, object]):
        self._e = Expr(model)

    def build(self) -> Expr:
        return self._e


def expr(ref: str, model: dict[str, object]) -> alerting.Query:
    body = {"refId": ref, "datasource": {"type": "__expr__", "uid": "__expr__"}, **model}
    return alerting.Query(ref).datasource_uid("__expr__").relative_time_range(am.RelativeTimeRange(from_val=0, to=0)).model(E(body))


def reduce(ref: str, of: str) -> alerting.Query:
    return expr(ref, {"type": "reduce", "expression": of, "reducer": "last", "settings": {"mode": "dropNN"}})


def math(ref: str, expression: str) -> alerting.Query:
    return expr(ref, {"type": "math", "expression": expression})


def rule(uid: str, title: str, summary: str, queries: list[alerting.Query], condition: str, for_: str, no_data: str = NO_DATA_OK) -> alerting.Rule:
    return (
        alerting.Rule(title)
        .uid(uid)
        .queries(queries)
        .condition(condition)
        .for_val(for_)
        .no_data_state(no_data)
        .exec_err_state("Error")
        .annotations({"summary": summary})
        .labels({"wattbus": "true"})
    )


# Readings alerts judge: good ones and those beyond their plausible or configured range (a
# fridge warmer than its probe's range is what the fridge rule is for). Not `error` (a
# reading whose read failed in part) nor `stale`.
JUDGED = "\"quality\" =~ /^(good|out_of_range)$/"
BY = '"site", "device"'


def stale(measurement: str, field: str) -> str:
    """Per site and device: readings (of any quality: a collector that sends is alive) in the
    last 60–90 s (three 30 s buckets, the current one partial), 0 for a device that sent some
    in the last 6 h and none since. A subquery, because an outer time condition would narrow
    the inner one and a silent device would vanish, not be 0. One measurement per query: the
    same device in two would give Grafana two series with one label set, an error."""
    inner = f'SELECT count("{field}") AS "n" FROM "{measurement}" WHERE time > now() - 6h AND time <= now() GROUP BY time(30s), {BY} fill(0)'
    return f'SELECT last("recent") FROM (SELECT moving_average("n", 3) AS "recent" FROM ({inner}) GROUP BY {BY}) GROUP BY {BY}'


def rules() -> list[alerting.Rule]:
    out = []
    own = sorted(k for k in OVERLOAD_W if k != "*")
    for measurement, suffix, what in [("power", "", "meters, CT channels"), ("current", "-sensors", "sensors that report current (PowMon)")]:
        for name, limit in sorted(OVERLOAD_W.items()):
            if name == "*":
                sel = f'"device" !~ /^({"|".join(own)})$/' if own else '"device" =~ /.*/'
                uid, title = f"wattbus-overload{suffix}", f"Power overload ({what})"
            elif measurement == "power":
                sel = f'"device" = \'{name}\''
                uid, title = f"wattbus-overload-{name}", f"Power overload: {name}"
            else:
                continue
            # Per channel: each phase of a meter, each CT channel; a meter's `total` is left
            # out (for three phases it is their sum, and no breaker sees it).
            q = f'SELECT abs(mean("power_w")) FROM "{measurement}" WHERE {JUDGED} AND {sel} AND "channel" != \'total\' AND $timeFilter GROUP BY {BY}, "channel"'
            out.append(
                rule(
                    uid,
                    title,
                    f"{{{{ $labels.device }}}}/{{{{ $labels.channel }}}} at {{{{ $labels.site }}}} drew more than {limit:g} W on average over a minute.",
                    [influx("A", q, 60), reduce("B", "A"), math("C", f"$B > {limit:g}")],
                    "C",
                    "1m",
                )
            )
    for uid, title, measurement, field in [
        ("wattbus-stale-power", "Collector stale: meters and CT channels", "power", "current_a"),
        ("wattbus-stale-current", "Collector stale: current sensors", "current", "current_a"),
        ("wattbus-stale-temperature", "Collector stale: temperature", "temperature", "temperature_c"),
    ]:
        out.append(
            rule(
                uid,
                title,
                "No reading from {{ $labels.device }} at {{ $labels.site }} for a minute or more (it sent some in the last 6 h): check its collector, cable or meter.",
                [influx("A", stale(measurement, field), 21600), reduce("B", "A"), math("C", "$B == 0")],
                "C",
                "1m",
            )
        )
    for uid, title, pattern, (low, high) in [
        ("wattbus-fridge", "Fridge out of range", "fridge", FRIDGE_C),
        ("wattbus-freezer", "Freezer out of range", "freezer", FREEZER_C),
    ]:
        # Out-of-range readings count: a fridge warmer than its probe's configured range is
        # the case this rule is for.
        base = f'FROM "temperature" WHERE {JUDGED} AND "channel" =~ /{pattern}/ AND $timeFilter GROUP BY {BY}, "channel"'
        window = TEMPERATURE_MINUTES * 60
        out.append(
            rule(
                uid,
                title,
                f"{{{{ $labels.device }}}}/{{{{ $labels.channel }}}} at {{{{ $labels.site }}}} has been outside {low:g}..{high:g} °C for {TEMPERATURE_MINUTES} minutes.",
                [
                    influx("A", f'SELECT min("temperature_c") {base}', window),
                    influx("B", f'SELECT max("temperature_c") {base}', window),
                    reduce("C", "A"),
                    reduce("D", "B"),
                    math("E", f"$C > {high:g} || $D < {low:g}"),
                ],
                "E",
                "0s",
            )
        )
    out.append(
        rule(
            "wattbus-service-down",
            "Service down",
            "{{ $labels.device }} at {{ $labels.site }} is offline or has not reported for a minute or more.",
            [
                influx("A", stale("service", "up"), 21600),
                influx("B", f'SELECT last("up") FROM "service" WHERE time > now() - 6h AND time <= now() GROUP BY {BY}', 21600),
                reduce("C", "A"),
                reduce("D", "B"),
                math("E", "$C == 0 || $D == 0"),
            ],
            "E",
            "1m",
        )
    )
    node = f'FROM "node_health" WHERE $timeFilter GROUP BY {BY}'
    out.append(
        rule(
            "wattbus-node-hot",
            "Node CPU temperature high",
            f"{{{{ $labels.device }}}} at {{{{ $labels.site }}}} has run above {CPU_HOT_C} °C for 5 minutes: the Pi slows its CPU down. Check its ventilation, case and heat sink.",
            [influx("A", f'SELECT min("cpu_temperature_c") {node}', 300), reduce("B", "A"), math("C", f"$B > {CPU_HOT_C}")],
            "C",
            "0s",
        )
    )
    out.append(
        rule(
            "wattbus-node-under-voltage",
            "Node under-voltage",
            "The firmware of {{ $labels.device }} at {{ $labels.site }} saw its supply voltage too low in the last 10 minutes: use the official power supply and a short, thick cable. Under-voltage corrupts SD cards.",
            [influx("A", f'SELECT max("under_voltage_occurred") {node}', 600), reduce("B", "A"), math("C", "$B > 0")],
            "C",
            "0s",
        )
    )
    out.append(
        rule(
            "wattbus-node-disk-full",
            "Node disk almost full",
            f"The data disk of {{{{ $labels.device }}}} at {{{{ $labels.site }}}} is more than {DISK_FULL_PCT} % full: journals and InfluxDB stop when it is. Lower retention, or free space.",
            [influx("A", f'SELECT last("disk_used_pct") {node}', 900), reduce("B", "A"), math("C", f"$B > {DISK_FULL_PCT}")],
            "C",
            "10m",
        )
    )
    out.append(
        rule(
            "wattbus-backup-age",
            "Backup older than 2 h",
            "The last good backup of {{ $labels.device }} at {{ $labels.site }} is more than 2 hours old, or there is none: `docker compose logs backup-rotator` says why (docs/backups.md). No status at all for 3 h also fires: backup-rotator is not running.",
            [influx("A", f'SELECT last("age_s") FROM "backup" WHERE $timeFilter GROUP BY {BY}', 10800), reduce("B", "A"), math("C", "$B > 7200")],
            "C",
            "5m",
            no_data="Alerting",
        )
    )
    return out


def rules_file() -> dict[str, object]:
    """Grafana's file provisioning format for alert rules (provisioning/alerting/*.json)."""
    built = []
    for r in rules():
        j = json.loads(JSONEncoder().encode(r.build()))
        # The API model's fields that the file format takes from the group instead.
        for k in ("folderUID", "ruleGroup", "orgID"):
            j.pop(k, None)
        built.append(j)
    return {
        "apiVersion": 1,
        "groups": [{"orgId": 1, "name": "wattbus", "folder": FOLDER, "interval": "1m", "rules": built}],
    }


# --- Output --------------------------------------------------------------------------------

DASHBOARDS = {
    "overview": overview,
    "meter": meter,
    "ct": ct,
    "temperatures": temperatures,
    "plugs": plugs,
    "health": health,
}


def render(obj: object) -> str:
    return json.dumps(json.loads(JSONEncoder().encode(obj)), indent=2, sort_keys=True) + "\n"


def outputs() -> dict[Path, str]:
    files = {ROOT / "dashboards" / f"{name}.json": render(build().build()) for name, build in DASHBOARDS.items()}
    files[ROOT / "provisioning" / "alerting" / "wattbus-rules.json"] = render(rules_file())
    return files


def schema_problems(path: Path, content: str) -> list[str]:
    """What Grafana's own types (the foundation SDK's models) drop or change in `content`: a
    key they do not know, a value of the wrong shape."""
    from grafana_foundation_sdk.cog.plugins import register_default_plugins

    register_default_plugins()
    data = json.loads(content)
    if path.parent.name == "dashboards":
        round_trip = json.loads(JSONEncoder().encode(dm.Dashboard.from_json(data)))
        pairs = [("dashboard", data, round_trip)]
    else:
        pairs = []
        for group in data["groups"]:
            for r in group["rules"]:
                again = json.loads(JSONEncoder().encode(am.Rule.from_json(r)))
                for k in ("folderUID", "ruleGroup", "orgID", "title"):
                    if k not in r:
                        again.pop(k, None)
                pairs.append((f"rule {r.get('uid')}", r, again))
    problems = []
    for what, a, b in pairs:
        problems += [f"{path.name}: {what}: {p}" for p in diff(a, b, "")]
    return problems


def diff(a: object, b: object, at: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in b:
                out.append(f"{at}/{k}: not in Grafana's schema")
            elif k not in a:
                continue  # a default the model fills in
            else:
                out += diff(a[k], b[k], f"{at}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in diff(x, y, f"{at}[{i}]")]
    return [] if a == b else [f"{at}: {a!r} became {b!r}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the files instead of writing them, and validate them")
    args = ap.parse_args()
    problems = []
    for path, content in outputs().items():
        if args.check:
            current = path.read_text() if path.exists() else None
            if current != content:
                problems.append(f"{path.relative_to(ROOT.parent)} is not what grafana/build.py builds: run it and commit the result")
            problems += schema_problems(path, current if current is not None else content)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            print(f"wrote {path.relative_to(ROOT.parent)}")
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
