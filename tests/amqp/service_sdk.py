"""Run by the tests as a child process (uamqp reads the CA from SSL_CERT_FILE in its environment):
`python service_sdk.py '{"cs": …, "device": …, "body": …, "properties": {…}}'` sends one C2D message
with azure-iot-hub's IoTHubRegistryManager and prints `{"ok": true}` or the error."""

from __future__ import annotations

import json
import sys

import uamqp
from azure.iot.hub import IoTHubRegistryManager


def main() -> None:
    args = json.loads(sys.argv[1])
    transport = uamqp.TransportType.AmqpOverWebsocket if args.get("websocket") else uamqp.TransportType.Amqp
    manager = IoTHubRegistryManager.from_connection_string(args["cs"], transport_type=transport)
    try:
        for body in args["bodies"]:
            manager.send_c2d_message(args["device"], body, properties=args.get("properties") or {})
        print(json.dumps({"ok": True}), flush=True)
    except Exception as exc:  # the test reads what the SDK raised
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
    finally:
        manager.amqp_svc_client.disconnect_sync()


if __name__ == "__main__":
    main()
