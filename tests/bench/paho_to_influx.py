#!/usr/bin/env python3
"""The pipeline the original projects used, for comparison in tests/bench/influx-writer.sh:
a paho-mqtt subscriber that POSTs every reading to InfluxDB's /write as it arrives.

Usage: paho_to_influx.py MQTT_PORT USER PASSWORD INFLUX_PORT DB COUNT
Prints one JSON line once COUNT readings have been written, or once nothing has arrived for
5 s: {"written": N, "t_done": <unix s of the last write>}.
"""
import http.client
import json
import sys
import time

import paho.mqtt.client as mqtt

mqtt_port, user, password, influx_port, db, count = sys.argv[1:7]
mqtt_port, influx_port, count = int(mqtt_port), int(influx_port), int(count)
conn = http.client.HTTPConnection("127.0.0.1", influx_port)
written = 0
t_last = None


def on_connect(client, userdata, flags, reason_code, properties):
    client.subscribe("wattbus/v1/+/meas/+/+", qos=1)


def on_subscribe(client, userdata, mid, reason_codes, properties):
    print(json.dumps({"subscribed": True}), flush=True)


def on_message(client, userdata, msg):
    global written, t_last
    m = json.loads(msg.payload)
    tags = f"channel={m['channel']},device={m['device']},quality={m['quality']},site={m['site']}"
    fields = ",".join(f"{k}={v}" for k, v in m["fields"].items())
    line = f"{m['measurement']},{tags} {fields} {m['ts_ms']}"
    conn.request("POST", f"/write?db={db}&precision=ms", body=line.encode())
    resp = conn.getresponse()
    resp.read()
    if resp.status != 204:
        print(json.dumps({"error": resp.status}), flush=True)
    written += 1
    t_last = time.time()
    if written == count:
        finish()


def finish():
    print(json.dumps({"written": written, "t_done": t_last}), flush=True)
    client.disconnect()


client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-bench")
client.username_pw_set(user, password)
client.on_connect = on_connect
client.on_subscribe = on_subscribe
client.on_message = on_message
client.connect("127.0.0.1", mqtt_port)
client.loop_start()
started = time.time()
while client.is_connected() or written == 0:
    time.sleep(0.5)
    if written == 0 and time.time() - started > 60:
        sys.exit("paho: nothing arrived within 60 s")
    if t_last is not None and written < count and time.time() - t_last > 5:
        finish()
        break
    if written >= count:
        break
client.loop_stop()
