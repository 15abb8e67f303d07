"""A pymodbus Modbus TCP server holding values encoded by pymodbus itself, for interop tests.

Usage: pymodbus_server.py PORT SPEC_JSON [rtu]
With `rtu`, it speaks Modbus RTU frames over TCP (as a serial device server does).
SPEC_JSON: {"registers": [{"area": "holding", "address": 0, "type": "f32", "order": "CDAB",
            "value": 1.5}, ...], "bits": [{"area": "coil", "address": 0, "value": true}, ...]}
Prints READY once the listener accepts connections.

The encoding is pymodbus's own (convert_to_registers), so a test that reads these values through
Updraft checks Updraft's decoder against an independent implementation, not against itself.
"""

import asyncio
import json
import socket
import sys

from pymodbus.client.mixin import ModbusClientMixin as M
from pymodbus.datastore import (
    ModbusDeviceContext,
    ModbusSequentialDataBlock,
    ModbusServerContext,
)
from pymodbus import FramerType
from pymodbus.server import ModbusTcpServer

TYPES = {
    "u16": M.DATATYPE.UINT16,
    "i16": M.DATATYPE.INT16,
    "u32": M.DATATYPE.UINT32,
    "i32": M.DATATYPE.INT32,
    "f32": M.DATATYPE.FLOAT32,
    "u64": M.DATATYPE.UINT64,
    "i64": M.DATATYPE.INT64,
    "f64": M.DATATYPE.FLOAT64,
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


async def main():
    port = int(sys.argv[1])
    spec = json.loads(sys.argv[2])
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
    device = ModbusDeviceContext(
        co=ModbusSequentialDataBlock(1, co),
        di=ModbusSequentialDataBlock(1, di),
        hr=ModbusSequentialDataBlock(1, hr),
        ir=ModbusSequentialDataBlock(1, ir),
    )
    context = ModbusServerContext(devices={1: device})
    framer = FramerType.RTU if len(sys.argv) > 3 and sys.argv[3] == "rtu" else FramerType.SOCKET
    server = ModbusTcpServer(context, address=("127.0.0.1", port), framer=framer)
    task = asyncio.create_task(server.serve_forever())
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            await asyncio.sleep(0.05)
    print("READY", flush=True)
    await task


if __name__ == "__main__":
    asyncio.run(main())
