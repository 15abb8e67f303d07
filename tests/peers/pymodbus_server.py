"""A pymodbus Modbus server holding values encoded by pymodbus itself, for interop tests.

Usage: pymodbus_server.py PORT SPEC_JSON [tcp | rtu | serial:DEVICE:BAUD]
`tcp` (default) is Modbus TCP on 127.0.0.1:PORT; `rtu` speaks Modbus RTU frames over TCP (as a
serial device server does); `serial:/dev/pts/3:115200` is Modbus RTU on a serial port (PORT is
then ignored).
SPEC_JSON: {"registers": [{"area": "holding", "address": 0, "type": "f32", "order": "CDAB",
            "value": 1.5}, ...], "bits": [{"area": "coil", "address": 0, "value": true}, ...]}
           for unit 1, or {"units": {"1": {...}, "2": {...}}} for several slaves, and
           "silent": [3] for unit ids that never answer (a dead slave on the line).
Prints READY once it serves, CONNECT for each client connection, and `RX UNIT SECONDS` (a
monotonic clock) for each request it receives, so a test can check the schedule the slave saw.

The encoding is pymodbus's own (convert_to_registers), so a test that reads these values through
Updraft checks Updraft's decoder against an independent implementation, not against itself.
"""

import asyncio
import json
import socket
import sys
import time

from pymodbus.client.mixin import ModbusClientMixin as M
from pymodbus.datastore import (
    ModbusDeviceContext,
    ModbusSequentialDataBlock,
    ModbusServerContext,
)
from pymodbus import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer

TYPES = {
    "u16": M.DATATYPE.UINT16,
    "i16": M.DATATYPE.INT16,
    "u32": M.DATATYPE.UINT32,
    "i32": M.DATATYPE.INT32,
    "f32": M.DATATYPE.FLOAT32,
    "u64": M.DATATYPE.UINT64,
    "i64": M.DATATYPE.INT64,
    "f64": M.DATATYPE.FLOAT64,
    "string": M.DATATYPE.STRING,
}
# Word order as pymodbus names it, and whether the bytes inside each word are swapped.
ORDERS = {
    "ABCD": ("big", False),
    "CDAB": ("little", False),
    "BADC": ("big", True),
    "DCBA": ("little", True),
}
ALIASES = {"ABCDEFGH": "ABCD", "GHEFCDAB": "CDAB", "BADCFEHG": "BADC", "HGFEDCBA": "DCBA"}


def encode(spec):
    order = ALIASES.get(spec.get("order", "ABCD"), spec.get("order", "ABCD"))
    word_order, swap = ORDERS[order]
    regs = M.convert_to_registers(spec["value"], TYPES[spec["type"]], word_order=word_order)
    if swap:
        regs = [((r & 0xFF) << 8) | (r >> 8) for r in regs]
    return regs


def device(spec):
    size = 1024
    hr, ir = [0] * size, [0] * size
    co, di = [False] * size, [False] * size
    for r in spec.get("registers", []):
        table = hr if r["area"] == "holding" else ir
        for i, word in enumerate(encode(r)):
            table[r["address"] + i] = word
    for b in spec.get("bits", []):
        (co if b["area"] == "coil" else di)[b["address"]] = bool(b["value"])
    # Block address 1 is request address 0 in pymodbus's sequential blocks.
    return ModbusDeviceContext(
        co=ModbusSequentialDataBlock(1, co),
        di=ModbusSequentialDataBlock(1, di),
        hr=ModbusSequentialDataBlock(1, hr),
        ir=ModbusSequentialDataBlock(1, ir),
    )


async def main():
    port = int(sys.argv[1])
    spec = json.loads(sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else "tcp"
    units = spec.get("units", {"1": spec})
    silent = set(spec.get("silent", []))
    devices = {int(u): device(s) for u, s in units.items()}
    for u in silent:
        devices.setdefault(u, device({}))
    context = ModbusServerContext(devices=devices)
    serial = mode.startswith("serial:")

    def unit_of(packet):
        # RTU: the address byte leads; Modbus TCP: the unit id follows the 6-byte MBAP header.
        if serial or mode == "rtu":
            return packet[0] if packet else None
        return packet[6] if len(packet) > 6 else None

    def trace_packet(sending, packet):
        unit = unit_of(packet)
        if not sending:
            print(f"RX {unit} {time.monotonic():.6f}", flush=True)
            return packet
        # A silent slave's answer never reaches the line.
        return b"" if unit in silent else packet

    # The readiness probe below connects too; it is not a client.
    ready = [False]

    def trace_connect(connected):
        if connected and ready[0]:
            print("CONNECT", flush=True)

    hooks = {"trace_packet": trace_packet, "trace_connect": trace_connect}
    if serial:
        _, path, baud = mode.split(":")
        server = ModbusSerialServer(context, framer=FramerType.RTU, port=path, baudrate=int(baud), **hooks)
        task = asyncio.create_task(server.serve_forever())
        await asyncio.sleep(0.5)
    else:
        framer = FramerType.RTU if mode == "rtu" else FramerType.SOCKET
        server = ModbusTcpServer(context, address=("127.0.0.1", port), framer=framer, **hooks)
        task = asyncio.create_task(server.serve_forever())
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
    ready[0] = True
    print("READY", flush=True)
    await task


if __name__ == "__main__":
    asyncio.run(main())
