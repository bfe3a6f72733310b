// A device driven by the Python tests over JSON lines: commands on stdin, events on stdout.
// Environment: DEVICE_CS (connection string; with ModuleId=… a ModuleClient), TRANSPORT (Amqp | AmqpWs),
// CA_FILE (the hub's CA), optional CERT_FILE + KEY_FILE (X.509 device). Uses Microsoft's
// azure-iot-device(-amqp) unchanged.
'use strict';
const fs = require('fs');
const readline = require('readline');
const { Client, ModuleClient, Message } = require('azure-iot-device');
const { Amqp, AmqpWs } = require('azure-iot-device-amqp');

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const fail = (op, err) => emit({ ev: 'error', op, name: err && err.name, message: err && String(err.message || err),
                                  cause: err && err.amqpError ? String(err.amqpError.condition) : undefined });

const Transport = process.env.TRANSPORT === 'AmqpWs' ? AmqpWs : Amqp;
const isModule = /(^|;)\s*ModuleId=/i.test(process.env.DEVICE_CS);
const client = (isModule ? ModuleClient : Client).fromConnectionString(process.env.DEVICE_CS, Transport);
const options = { ca: fs.readFileSync(process.env.CA_FILE, 'utf8') };
if (process.env.CERT_FILE) {
  options.cert = fs.readFileSync(process.env.CERT_FILE, 'utf8');
  options.key = fs.readFileSync(process.env.KEY_FILE, 'utf8');
}
let twin = null;
const abandoned = new Set();  // action "abandon-once": abandon the first delivery, complete the next

client.on('error', (err) => fail('client', err));
client.on('disconnect', (err) => emit({ ev: 'disconnect', message: err && String(err.message || err) }));

function messageOf(cmd) {
  const msg = new Message(cmd.body);
  if (cmd.messageId) msg.messageId = cmd.messageId;
  if (cmd.correlationId) msg.correlationId = cmd.correlationId;
  if (cmd.contentType) msg.contentType = cmd.contentType;
  if (cmd.contentEncoding) msg.contentEncoding = cmd.contentEncoding;
  for (const [k, v] of Object.entries(cmd.props || {})) msg.properties.add(k, v);
  return msg;
}

function onC2d(msg) {
  const props = {};
  for (let i = 0; i < msg.properties.count(); i++) {
    const p = msg.properties.getItem(i);
    props[p.key] = p.value;
  }
  let action = props.action || 'complete';
  if (action === 'abandon-once') {
    action = abandoned.has(msg.messageId) ? 'complete' : 'abandon';
    abandoned.add(msg.messageId);
  }
  emit({ ev: 'c2d', messageId: msg.messageId, correlationId: msg.correlationId, data: msg.data.toString(),
         props, ack: msg.ack, contentType: msg.contentType, contentEncoding: msg.contentEncoding,
         expiryTimeUtc: msg.expiryTimeUtc, to: msg.to, action });
  const done = (err) => (err ? fail(action, err) : emit({ ev: 'settled', messageId: msg.messageId, action }));
  if (action === 'reject') client.reject(msg, done);
  else if (action === 'abandon') client.abandon(msg, done);
  else client.complete(msg, done);
}

const ops = {
  open: (cmd, done) => client.setOptions(options, (err) => (err ? done(err) : client.open((e) => done(e)))),
  send: (cmd, done) => client.sendEvent(messageOf(cmd), (err) => done(err)),
  c2d: (cmd, done) => { client.on('message', onC2d); done(); },
  twin: (cmd, done) => client.getTwin((err, t) => {
    if (err) return done(err);
    if (!twin) {
      twin = t;
      twin.on('properties.desired', (patch) => emit({ ev: 'desired', patch }));
    }
    done(null, { desired: t.properties.desired, reported: t.properties.reported });
  }),
  report: (cmd, done) => twin.properties.reported.update(cmd.patch, (err) => done(err)),
  methods: (cmd, done) => {
    for (const name of cmd.names) {
      const onMethod = isModule ? client.onMethod.bind(client) : client.onDeviceMethod.bind(client);
      onMethod(name, (req, res) => {
        emit({ ev: 'method', name: req.methodName, payload: req.payload, requestId: req.requestId });
        res.send(name === 'fail' ? 500 : 200, { echo: req.payload, name: req.methodName }, (err) => err && fail('method-response', err));
      });
    }
    done();
  },
  close: (cmd, done) => client.close((err) => done(err)),
};

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const cmd = JSON.parse(line);
  const op = ops[cmd.op];
  if (!op) return emit({ ev: 'error', op: cmd.op, message: 'unknown op' });
  try {
    op(cmd, (err, result) => (err ? fail(cmd.op, err) : emit({ ev: 'done', op: cmd.op, id: cmd.id, result })));
  } catch (err) {
    fail(cmd.op, err);
  }
}).on('close', () => client.close(() => process.exit(0)));
