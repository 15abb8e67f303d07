"""An MQTT 5 client (Eclipse Paho) that checks what the embedded broker does for MQTT 5 clients.

Usage: mqtt5_probe.py HOST PORT USER PASSWORD
USER may publish to hmi/# and subscribe within updraft/# and hmi/# (the test's topic rights).
Prints one JSON object with what it observed; the Rust test (tests/all/conformance.rs) asserts.
"""

import json
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

HOST, PORT, USER, PASSWORD = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
WAIT = 10
out = {}


def client(cid):
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)


def connect_code(user, password):
    """The CONNACK reason code for a login (None if the socket closed without one)."""
    c = client(f"probe-login-{user}")
    got = threading.Event()
    code = {}

    def on_connect(_c, _u, _flags, reason, _props):
        code["v"] = reason.value
        got.set()

    c.on_connect = on_connect
    if user is not None:
        c.username_pw_set(user, password)
    c.connect(HOST, PORT, keepalive=60)
    c.loop_start()
    got.wait(WAIT)
    c.loop_stop()
    c.disconnect()
    return code.get("v")


out["connack_wrong_password"] = connect_code(USER, "wrong")
out["connack_no_login"] = connect_code(None, None)

# A client with keep alive 0 that stays for longer than any keep-alive timeout would allow.
c = client("probe-main")
c.username_pw_set(USER, PASSWORD)
events = {"connack": threading.Event()}
suback = {}
puback = {}
messages = []
lock = threading.Lock()


def on_connect(_c, _u, _flags, reason, _props):
    out["connack"] = reason.value
    events["connack"].set()


def on_subscribe(_c, _u, mid, reasons, _props):
    suback[mid] = [r.value for r in reasons]


def on_publish(_c, _u, mid, reason, _props):
    puback[mid] = reason.value


def on_message(_c, _u, msg):
    with lock:
        messages.append({"topic": msg.topic, "qos": msg.qos, "retain": bool(msg.retain),
                         "payload": msg.payload.decode(errors="replace")})


c.on_connect = on_connect
c.on_subscribe = on_subscribe
c.on_publish = on_publish
c.on_message = on_message
c.connect(HOST, PORT, keepalive=0, clean_start=True)
c.loop_start()
events["connack"].wait(WAIT)


def wait_for(d, key):
    deadline = time.time() + WAIT
    while key not in d and time.time() < deadline:
        time.sleep(0.02)
    return d.get(key)


# Subscriptions: one outside the user's rights, two within.
_, mid_denied = c.subscribe("secret/#", qos=1)
_, mid_hmi = c.subscribe("hmi/#", qos=1)
_, mid_plant = c.subscribe("updraft/#", qos=0)
out["suback_denied"] = wait_for(suback, mid_denied)
out["suback_hmi"] = wait_for(suback, mid_hmi)
out["suback_plant"] = wait_for(suback, mid_plant)

# Publishes: QoS 1 outside the rights (refused with a reason code), QoS 1 and QoS 0 within.
out["puback_denied"] = wait_for(puback, c.publish("plant/x", "no", qos=1).mid)
out["puback_allowed"] = wait_for(puback, c.publish("hmi/q1", "one", qos=1).mid)
c.publish("hmi/q0", "zero", qos=0)
# A retained message, for a second client to find.
props = Properties(PacketTypes.PUBLISH)
props.MessageExpiryInterval = 3600
wait_for(puback, c.publish("hmi/retained", "kept", qos=1, retain=True, properties=props).mid)
time.sleep(1.5)
c.loop_stop()
with lock:
    out["messages"] = list(messages)
c.disconnect()

# A late MQTT 5 subscriber gets the retained message.
late = client("probe-late")
late.username_pw_set(USER, PASSWORD)
late_msgs = []
late.on_message = lambda _c, _u, m: late_msgs.append(
    {"topic": m.topic, "qos": m.qos, "retain": bool(m.retain), "payload": m.payload.decode()})
late.connect(HOST, PORT, keepalive=30)
late.loop_start()
late.subscribe("hmi/retained", qos=1)
deadline = time.time() + WAIT
while not late_msgs and time.time() < deadline:
    time.sleep(0.05)
late.loop_stop()
late.disconnect()
out["late"] = late_msgs

print(json.dumps(out))
