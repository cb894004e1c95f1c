#!/usr/bin/env python3
"""An ORNO WE-515 as pymodbus serves it: the interop peer for wattbus's Modbus code.

pymodbus is a Modbus implementation nobody on wattbus wrote, so a test against it checks our
framing, CRCs, exception handling and signed decoding against someone else's reading of the spec.
The values below are encoded by pymodbus itself (DataType.INT32 etc., big-endian = high word
first, as the WE-515 sends them), not by us.

Written for pymodbus 3.16.1 (the SimData/SimDevice API; pip install pymodbus==3.16.1
pyserial==3.5).

Usage:
    python3 we515_server.py --tcp PORT [--host 127.0.0.1] [--slaves 1,2] [--trace]
    python3 we515_server.py --rtu PATH [--baud 9600] [--parity N|E|O] [--slaves 1,2] [--trace]

`--tcp 0` picks a free port; the ready line says which.

Ready line (stdout, flushed, once the server listens):
    READY tcp 127.0.0.1:PORT slaves=1,2
    READY rtu /tmp/pty-b slaves=1,2
A test waits for a line starting with "READY " and takes the port from it.

With --trace, every request a slave answers is one line on stdout:
    REQ slave=1 fc=3 addr=0x0130 count=44
(writes: fc=6 or fc=16, count = registers written). Count these to check how many requests a
client sends per poll.

Slaves that are not served do not answer at all (like an absent meter on RS485): the client
times out. Measurement registers are read-only (a write gets IllegalDataAddress, 02); so are
addresses outside the map below (reads and writes). The map covers 0x0130..0x015B and
0xA000..0xA027 completely (unused registers read 0), so the two coalesced WE-515 reads work.

Register map (holding registers, FC03; every slave serves the same values):

    addr    type  raw          value                 meaning
    0x0110  u16   slave id     1-247, writable       slave address (FC06/FC16; the slave answers
                                                     the write from its old id, then moves)
    0x0111  u16   4            9600 baud, writable   baud code 1=1200 2=2400 3=4800 4=9600
                                                     (stored only; the line speed stays)
    0x0130  u16   5001         50.01 Hz              frequency
    0x0131  u16   23145        231.45 V              L1 voltage
    0x0139  u32   5678         5.678 A               L1 current
    0x0140  i32   -1234        -1234 W               L1 active power (export), words FFFF FB2E
    0x0146  i32   -1234        -1234 W               total active power
    0x0148  i32   -321         -321 var              L1 reactive power
    0x014E  i32   -321         -321 var              total reactive power
    0x0150  i32   1418         1418 VA               L1 apparent power
    0x0156  i32   1418         1418 VA               total apparent power
    0x0158  i16   -870         -0.870                L1 power factor (leading), word FC9A
    0x015B  i16   -870         -0.870                total power factor
    0xA000  u32   123456       1234.56 kWh           total active energy
    0xA002  u32   100000       1000.00 kWh           T1 (T1 + T2 = total)
    0xA004  u32   23456        234.56 kWh            T2
    0xA006  u32   0            0                     T3
    0xA008  u32   0            0                     T4
    0xA01E  u32   6543         65.43 kvarh           total reactive energy
    0xA020  u32   6000         60.00 kvarh           reactive T1
    0xA022  u32   543          5.43 kvarh            reactive T2
    0xA024  u32   0                                  reactive T3
    0xA026  u32   0                                  reactive T4

Input registers (FC04) are not served: every FC04 read gets IllegalDataAddress, as a scan that
probes for Eastron meters expects from an ORNO.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simruntime import SimRuntime

ADDRESS_REGISTER = 0x0110
BAUD_REGISTER = 0x0111
BAUD_CODES = {1200: 1, 2400: 2, 4800: 3, 9600: 4}

# (address, pymodbus type, raw value): the table in the docstring.
MEASUREMENTS = [
    (0x0130, DataType.UINT16, 5001),
    (0x0131, DataType.UINT16, 23145),
    (0x0139, DataType.UINT32, 5678),
    (0x0140, DataType.INT32, -1234),
    (0x0146, DataType.INT32, -1234),
    (0x0148, DataType.INT32, -321),
    (0x014E, DataType.INT32, -321),
    (0x0150, DataType.INT32, 1418),
    (0x0156, DataType.INT32, 1418),
    (0x0158, DataType.INT16, -870),
    (0x015B, DataType.INT16, -870),
    (0xA000, DataType.UINT32, 123456),
    (0xA002, DataType.UINT32, 100000),
    (0xA004, DataType.UINT32, 23456),
    (0xA006, DataType.UINT32, 0),
    (0xA008, DataType.UINT32, 0),
    (0xA01E, DataType.UINT32, 6543),
    (0xA020, DataType.UINT32, 6000),
    (0xA022, DataType.UINT32, 543),
    (0xA024, DataType.UINT32, 0),
    (0xA026, DataType.UINT32, 0),
]
# The blocks a WE-515 answers in full; registers not in MEASUREMENTS read 0.
BLOCKS = [(0x0130, 0x015B), (0xA000, 0xA027)]

WIDTH = {DataType.UINT16: 1, DataType.INT16: 1, DataType.UINT32: 2, DataType.INT32: 2}


def holding_map(slave: int, baud_code: int) -> list[SimData]:
    """The WE-515's holding registers as pymodbus SimData entries."""
    data = [
        SimData(ADDRESS_REGISTER, values=slave, datatype=DataType.UINT16),
        SimData(BAUD_REGISTER, values=baud_code, datatype=DataType.UINT16),
    ]
    taken = set()
    for address, datatype, value in MEASUREMENTS:
        data.append(SimData(address, values=value, datatype=datatype, readonly=True))
        taken.update(range(address, address + WIDTH[datatype]))
    for first, last in BLOCKS:
        for address in range(first, last + 1):
            if address not in taken:
                data.append(
                    SimData(address, values=0, datatype=DataType.UINT16, readonly=True)
                )
    return data


class Bus:
    """The slaves on the line, by their current id.

    Stands in for pymodbus's SimCore (same three methods) so that an id nobody serves raises
    NoSuchIdException, which the server with ignore_missing_devices=True answers with silence,
    and so that a slave can change its id at run time.
    """

    def __init__(self, trace: bool):
        self.devices: dict[int, SimRuntime] = {}
        self.trace = trace

    def device_ids(self) -> list[int]:
        return list(self.devices)

    def _get(self, device_id: int) -> SimRuntime:
        runtime = self.devices.get(device_id)
        if runtime is None:
            raise NoSuchIdException(f"no slave {device_id}")
        return runtime

    async def async_getValues(self, device_id, func_code, address, count=1):
        return await self._get(device_id).async_getValues(func_code, address, count)

    async def async_setValues(self, device_id, func_code, address, values):
        return await self._get(device_id).async_setValues(func_code, address, values)

    def move(self, old: int, new: int) -> None:
        if old in self.devices and new not in self.devices:
            self.devices[new] = self.devices.pop(old)
            print(f"MOVED slave={old} to={new}", flush=True)


class Slave:
    """One meter's behaviour: its id, and what its configuration registers accept."""

    def __init__(self, bus: Bus, slave_id: int):
        self.bus = bus
        self.id = slave_id

    async def action(self, func_code, start_address, address, count, registers, values):
        # pymodbus answers a write by writing and then reading the register back; that
        # read-back (a write's function code, no values) is not a request of its own.
        if values is None and func_code not in (3, 4):
            return None
        if self.bus.trace:
            n = len(values) if values is not None else count
            print(
                f"REQ slave={self.id} fc={func_code} addr={address:#06x} count={n}",
                flush=True,
            )
        if values is None:
            return None
        for offset, value in enumerate(values):
            target = address + offset
            if target == ADDRESS_REGISTER:
                if not 1 <= value <= 247:
                    return ExcCodes.ILLEGAL_VALUE
                # The answer to this write (and pymodbus's read-back of the written register
                # that builds it) still comes from the old id. pymodbus handles a request
                # without yielding to the event loop, so call_soon runs once it is sent.
                asyncio.get_running_loop().call_soon(functools.partial(self.move, value))
            elif target == BAUD_REGISTER and value not in BAUD_CODES.values():
                return ExcCodes.ILLEGAL_VALUE
        return None

    def move(self, new: int) -> None:
        old, self.id = self.id, new
        self.bus.move(old, new)


def build(slaves: list[int], baud_code: int, trace: bool) -> tuple[Bus, list[SimDevice]]:
    bus = Bus(trace)
    devices = []
    for slave_id in slaves:
        slave = Slave(bus, slave_id)
        device = SimDevice(
            id=slave_id,
            simdata=(
                [SimData(0, values=False, datatype=DataType.BITS)],
                [SimData(0, values=False, datatype=DataType.BITS)],
                holding_map(slave_id, baud_code),
                # No input registers: one invalid register so every FC04 read is refused.
                [SimData(0, datatype=DataType.INVALID)],
            ),
            action=slave.action,
        )
        devices.append(device)
        bus.devices[slave_id] = SimRuntime(device)
    return bus, devices


def parse_slaves(text: str) -> list[int]:
    ids = [int(part) for part in text.split(",") if part.strip()]
    if not ids or any(not 1 <= i <= 247 for i in ids) or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError("slave ids must be distinct, 1 to 247")
    return ids


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", type=int, metavar="PORT", help="Modbus TCP on this port")
    where.add_argument("--rtu", metavar="PATH", help="Modbus RTU on this serial port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--baud", type=int, default=9600, choices=sorted(BAUD_CODES))
    parser.add_argument("--parity", default="N", choices=["N", "E", "O"])
    parser.add_argument("--slaves", type=parse_slaves, default=[1])
    parser.add_argument("--trace", action="store_true", help="print one REQ line per request")
    args = parser.parse_args()

    bus, devices = build(args.slaves, BAUD_CODES[args.baud], args.trace)
    if args.tcp is not None:
        server = ModbusTcpServer(
            devices, address=(args.host, args.tcp), ignore_missing_devices=True
        )
    else:
        server = ModbusSerialServer(
            devices,
            framer=FramerType.RTU,
            port=args.rtu,
            baudrate=args.baud,
            parity=args.parity,
            ignore_missing_devices=True,
        )
    # Our Bus replaces the SimCore pymodbus built from the same devices (see Bus).
    server.context = bus
    await server.serve_forever(background=True)
    ids = ",".join(str(i) for i in args.slaves)
    if args.tcp is not None:
        port = args.tcp
        sockets = getattr(server.transport, "sockets", None)
        if sockets:
            port = sockets[0].getsockname()[1]
        print(f"READY tcp {args.host}:{port} slaves={ids}", flush=True)
    else:
        print(f"READY rtu {args.rtu} slaves={ids}", flush=True)
    await server.serving


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
