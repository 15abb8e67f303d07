"""An independent OPC-UA client (asyncua) probes a server's standard nodes and prints them as JSON.

Used by tests/all/opcua.rs against the built-in simulator, whose ns=0 is Updraft's own small one
(gateway/src/drivers/opcua/ns0.rs): what a generic client reads first must be there.
"""

import asyncio
import json
import sys
from datetime import datetime, timezone

from asyncua import Client, ua


async def main(url: str) -> None:
    async with Client(url=url, timeout=5) as client:
        objects = client.nodes.objects
        children = await objects.get_children()
        names = [(await c.read_browse_name()).Name for c in children]
        server = client.nodes.server
        current = await client.get_node(ua.ObjectIds.Server_ServerStatus_CurrentTime).read_value()
        status = await client.get_node(ua.ObjectIds.Server_ServerStatus).read_value()
        limit = await client.get_node(
            ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall
        ).read_value()
        print(
            json.dumps(
                {
                    "namespaces": await client.get_namespace_array(),
                    "state": int(await client.get_node(ua.ObjectIds.Server_ServerStatus_State).read_value()),
                    "current_time_age_s": (datetime.now(timezone.utc) - current.replace(tzinfo=timezone.utc)).total_seconds(),
                    "status_state": int(status.State),
                    "product": status.BuildInfo.ProductUri,
                    "objects": names,
                    "server_children": sorted(
                        [(await c.read_browse_name()).Name for c in await server.get_children()]
                    ),
                    "max_monitored_items_per_call": limit,
                }
            )
        )


asyncio.run(main(sys.argv[1]))
