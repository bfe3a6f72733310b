// Microsoft's Node.js service SDK (azure-iothub, Amqp transport) reading file upload notifications, driven by
// the Python tests. Environment: SERVICE_CS (a ServiceConnect policy's connection string); the hub's CA comes
// from NODE_EXTRA_CA_CERTS. Arguments: how many notifications to read. Each one is printed as a JSON line
// ({"ev":"file-notification","data":…,"properties":{…}}) and completed (the SDK's receiver auto-accepts, as
// `new Amqp(true)` asks, so `complete` may report the lock as gone: printed, not fatal); then {"ev":"done"}.
'use strict';
const { Client } = require('azure-iothub');

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const fail = (op, err) => {
  emit({ ev: 'error', op, name: err && err.name, message: err && String(err.message || err) });
  process.exit(1);
};

const wanted = Number(process.argv[2] || 1);
const client = Client.fromConnectionString(process.env.SERVICE_CS);
let seen = 0;

client.open((err) => {
  if (err) return fail('open', err);
  client.getFileNotificationReceiver((err2, receiver) => {
    if (err2) return fail('receiver', err2);
    emit({ ev: 'attached' });
    receiver.on('error', (e) => fail('receiver', e));
    receiver.on('message', (msg) => {
      const properties = {};
      for (let i = 0; i < msg.properties.count(); i++) {
        const p = msg.properties.getItem(i);
        properties[p.key] = p.value;
      }
      emit({ ev: 'file-notification', data: msg.getData().toString(), properties,
             contentType: msg.contentType });
      receiver.complete(msg, (e) => {
        emit({ ev: 'completed', error: e ? e.name : null });
        seen += 1;
        if (seen >= wanted) client.close(() => { emit({ ev: 'done' }); process.exit(0); });
      });
    });
  });
});
