// Microsoft's Node.js SDKs against a Tether hub with nothing but a connection string: the service
// Registry (REST on 443), a device over the HTTP transport (443) and over MQTT on WebSockets (443).
// The hub's dev root comes from NODE_EXTRA_CA_CERTS, as docs/deployment.md says.
// Environment: OWNER_CS, DEVICE_ID, DEVICE_KEY, HUB_HOST. Prints one JSON object with what it saw.
'use strict';

const { Registry } = require('azure-iothub');
const { Client, Message } = require('azure-iot-device');
const { Http } = require('azure-iot-device-http');
const { MqttWs } = require('azure-iot-device-mqtt');

const out = {};

function message(body, props) {
  const m = new Message(body);
  for (const [k, v] of Object.entries(props || {})) m.properties.add(k, v);
  return m;
}

async function service() {
  const registry = Registry.fromConnectionString(process.env.OWNER_CS);
  const id = `node-svc-${Date.now()}`;
  try {
    await registry.get(id);
    out.missing = 'no error';
  } catch (err) {
    out.missing = err.constructor.name; // DeviceNotFoundError needs Azure's error body
  }
  await registry.create({ deviceId: id, status: 'enabled' });
  out.listed = (await registry.list()).responseBody.some((d) => d.deviceId === id);
  const device = (await registry.get(id)).responseBody;
  device.status = 'disabled';
  // Node's bulk update sends the device object as read (`etag`, not `eTag`) with UpdateIfMatchETag
  const bulk = (await registry.updateDevices([device], false)).responseBody;
  out.bulk = bulk.isSuccessful;
  out.bulkStatus = (await registry.get(id)).responseBody.status;
  out.stats = (await registry.getRegistryStatistics()).responseBody.totalDeviceCount > 0;
  await registry.updateTwin(id, { tags: { site: 'node' } }, '*');
  const query = registry.createQuery(`SELECT * FROM devices WHERE tags.site = 'node'`, 1);
  const page = await query.nextAsTwin();
  out.query = page.result.map((t) => t.deviceId);
  out.queryHasMore = query.hasMoreResults;
  await registry.delete(id);
}

async function deviceHttp() {
  const cs = `HostName=${process.env.HUB_HOST};DeviceId=${process.env.DEVICE_ID};SharedAccessKey=${process.env.DEVICE_KEY}`;
  const client = Client.fromConnectionString(cs, Http);
  await client.setOptions({ http: { receivePolicy: { interval: 1 } } });
  await client.open();
  await client.sendEvent(message('{"n":1}', { zone: 'single' }));
  await client.sendEventBatch([message('a', { zone: 'b1' }), message('b', { zone: 'b2' })]);
  // C2D over HTTP: the transport polls GET /devices/{id}/messages/devicebound and completes with
  // DELETE .../devicebound/{lockToken} (lower case, as the SDK writes it)
  out.c2d = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no C2D message over HTTP')), 60000);
    client.on('message', (msg) => {
      client.complete(msg, (err) => {
        clearTimeout(timer);
        if (err) reject(err);
        else resolve(msg.data.toString());
      });
    });
  });
  await client.close();
}

async function deviceMqttWs() {
  const cs = `HostName=${process.env.HUB_HOST};DeviceId=${process.env.DEVICE_ID};SharedAccessKey=${process.env.DEVICE_KEY}`;
  const client = Client.fromConnectionString(cs, MqttWs);
  await client.open();
  await client.sendEvent(message('ws', { zone: 'ws' }));
  out.twinReported = await new Promise((resolve, reject) => {
    client.getTwin((err, twin) => {
      if (err) return reject(err);
      twin.properties.reported.update({ node: true }, (e) => (e ? reject(e) : resolve(true)));
    });
  });
  await client.close();
}

(async () => {
  try {
    await service();
    await deviceHttp();
    await deviceMqttWs();
    out.ok = true;
  } catch (err) {
    out.ok = false;
    out.error = `${err.constructor.name}: ${err.message}`;
  }
  console.log(JSON.stringify(out));
  process.exit(0);
})();
