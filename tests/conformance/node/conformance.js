// Microsoft's Node.js SDKs against a Tether hub with nothing but a connection string: the service
// Registry (REST on 443) with configurations and an export, the JobClient, a device over the HTTP
// transport (443, with a file upload to the hub's blob storage) and over MQTT on WebSockets (443).
// The hub's dev root (which also signed the storage's certificate) comes from NODE_EXTRA_CA_CERTS, as
// docs/deployment.md says.
// Environment: OWNER_CS, DEVICE_ID, DEVICE_KEY, HUB_HOST, EXPORT_URI (a container SAS URI). Prints one
// JSON object with what it saw.
'use strict';

const { Readable } = require('stream');
const { JobClient, Registry } = require('azure-iothub');
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

async function until(what, check) {
  const deadline = Date.now() + 60000;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

async function fleet() {
  const registry = Registry.fromConnectionString(process.env.OWNER_CS);
  const jobs = JobClient.fromConnectionString(process.env.OWNER_CS);
  const id = `node-fleet-${Date.now()}`;
  await registry.create({ deviceId: id, status: 'enabled' });
  // configurations: Node quotes the etag on update and reads the list as an array
  const config = {
    id: `node-conf-${Date.now()}`,
    priority: 1,
    targetCondition: `deviceId = '${id}'`,
    content: { deviceContent: { 'properties.desired.nodeconf': { by: 'node' } } },
  };
  await registry.addConfiguration(config);
  const got = (await registry.getConfiguration(config.id)).responseBody;
  got.priority = 2;
  await registry.updateConfiguration(got);
  out.configPriority = (await registry.getConfiguration(config.id)).responseBody.priority;
  out.configListed = (await registry.getConfigurations()).responseBody.some((c) => c.id === config.id);
  out.configApplied = await until('the configuration in the twin', async () =>
    (await registry.getTwin(id)).responseBody.properties.desired.nodeconf);
  await registry.removeConfiguration(config.id);
  await registry.applyConfigurationContentOnDevice(id, { deviceContent: { 'properties.desired.applied': 'node' } });
  out.applied = (await registry.getTwin(id)).responseBody.properties.desired.applied;
  // a scheduled twin update, and the job query (Node reads an array)
  const jobId = `node-job-${Date.now()}`;
  const patch = { etag: '*', properties: { desired: { nodejob: 1 } } };
  await jobs.scheduleTwinUpdate(jobId, `deviceId IN ['${id}']`, patch, new Date(), 300);
  out.jobStatus = await until('the twin update job', async () => {
    const status = (await jobs.getJob(jobId)).jobStatus.status;
    return ['completed', 'failed', 'cancelled'].includes(status) && status;
  });
  out.jobTwin = (await registry.getTwin(id)).responseBody.properties.desired.nodejob;
  const page = await jobs.createQuery('scheduleUpdateTwin', 'completed').next();
  out.jobQueried = page.result.some((j) => j.jobId === jobId);
  // an export to blob storage; import/export jobs list as an array (create and get promise the body)
  const exportId = (await registry.exportDevicesToBlob(process.env.EXPORT_URI, false)).jobId;
  out.exportStatus = await until('the export', async () => {
    const status = (await registry.getJob(exportId)).status;
    return ['completed', 'failed', 'cancelled'].includes(status) && status;
  });
  out.exportListed = (await registry.listJobs()).responseBody.some((j) => j.jobId === exportId);
  out.fleetDevice = id;
}

async function deviceHttp() {
  const cs = `HostName=${process.env.HUB_HOST};DeviceId=${process.env.DEVICE_ID};SharedAccessKey=${process.env.DEVICE_KEY}`;
  const client = Client.fromConnectionString(cs, Http);
  await client.setOptions({ http: { receivePolicy: { interval: 1 } } });
  await client.open();
  await client.sendEvent(message('{"n":1}', { zone: 'single' }));
  await client.sendEventBatch([message('a', { zone: 'b1' }), message('b', { zone: 'b2' })]);
  // file upload: SAS from the hub, Put Block / Put Block List to storage, the completion with the
  // correlation id in the path (Node's form)
  const data = Buffer.from('uploaded by node\n'.repeat(64));
  await client.uploadToBlob('node/hello.txt', Readable.from([data]), data.length);
  out.uploaded = data.length;
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
    await fleet();
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
