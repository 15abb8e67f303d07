"""An asyncua OPC-UA server: an independent peer for Updraft's OPC-UA driver.

Usage: asyncua_server.py PORT
Serves opc.tcp://127.0.0.1:PORT/ without security. Namespace "urn:updraft:test:asyncua" (index 2)
holds, under the folder Plant (ns=2;s=Plant):
  Plant.Temperature  Double   20.0 .. 24.9, changes every 100 ms
  Plant.Count        Int32    +1 every 100 ms (restarts at 0 with the server)
  Plant.Running      Boolean  true
  Plant.Name         String   "PRESS-9"
  Plant.Calibrated   Float    7.5, source timestamp 2024-05-06T07:08:09Z (the device's clock)
  Plant.Setpoint     UInt16   40, writable by clients
  Plant.Big          UInt64   2^63 + 1 (beyond a double's exact integers)
Prints READY once it serves, and `WRITE NAME VALUE` when a client writes Plant.Setpoint.
Reads commands on stdin: `DROP-SUBS` deletes every client subscription while keeping the
sessions, as a server does that lost its subscriptions but not its connections (prints DROPPED N).
"""

import asyncio
import datetime
import logging
import sys

from asyncua import Server, ua

NS = "urn:updraft:test:asyncua"


async def main():
    port = int(sys.argv[1])
    logging.basicConfig(level=logging.ERROR)
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    server.set_server_name("asyncua peer")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace(NS)
    plant = await server.nodes.objects.add_folder(ua.NodeId("Plant", idx), "Plant")

    async def var(name, value, vtype):
        return await plant.add_variable(ua.NodeId(f"Plant.{name}", idx), name, ua.Variant(value, vtype))

    temperature = await var("Temperature", 20.0, ua.VariantType.Double)
    count = await var("Count", 0, ua.VariantType.Int32)
    await var("Running", True, ua.VariantType.Boolean)
    await var("Name", "PRESS-9", ua.VariantType.String)
    calibrated = await var("Calibrated", 7.5, ua.VariantType.Float)
    setpoint = await var("Setpoint", 40, ua.VariantType.UInt16)
    await setpoint.set_writable()
    await var("Big", 2**63 + 1, ua.VariantType.UInt64)
    stamp = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
    await calibrated.write_value(
        ua.DataValue(ua.Variant(7.5, ua.VariantType.Float), SourceTimestamp=stamp, ServerTimestamp=stamp)
    )

    class Writes:
        def datachange_notification(self, node, val, data):
            print(f"WRITE Setpoint {val}", flush=True)

    async with server:
        sub = await server.create_subscription(100, Writes())
        await sub.subscribe_data_change(setpoint)
        own = sub.subscription_id

        async def commands():
            loop = asyncio.get_running_loop()
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line:
                    return
                if line.strip() == "DROP-SUBS":
                    service = server.iserver.subscription_service
                    ids = [i for i in list(service.subscriptions) if i != own]
                    await service.delete_subscriptions(ids)
                    print(f"DROPPED {len(ids)}", flush=True)

        asyncio.create_task(commands())
        print("READY", flush=True)
        n = 0
        while True:
            await asyncio.sleep(0.1)
            n += 1
            await temperature.write_value(ua.Variant(20.0 + (n % 50) / 10, ua.VariantType.Double))
            await count.write_value(ua.Variant(n, ua.VariantType.Int32))


if __name__ == "__main__":
    asyncio.run(main())
